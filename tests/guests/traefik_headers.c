/* A Traefik-style header plugin, shaped like a TinyGo >= 0.35 command module.
 *
 * Its configuration is the JSON Traefik passes, e.g. {"headers":{"X-Foo":"bar"}}:
 * `_start` reads it with get_config, keeps the string pairs of the top-level
 * "headers" object, and ends with proc_exit(0), as TinyGo's main does.  Every
 * request then gets those headers (set on the request: the downstream sees
 * them).  The JSON scan is deliberately small: string values, with the escapes
 * \" \\ \/ \n \t and \u00XX.  Built freestanding (no libc) by the tests.
 */
#include "http_handler.h"

__attribute__((import_module("wasi_snapshot_preview1"), import_name("proc_exit")))
void wasi_proc_exit(uint32_t code);

#define MAX_CONFIG 8192
#define MAX_PAIRS 16
#define MAX_TEXT 256

static char config[MAX_CONFIG];
static uint32_t config_len;
static uint32_t pos;

static struct {
    char name[MAX_TEXT];
    uint32_t name_len;
    char value[MAX_TEXT];
    uint32_t value_len;
} pairs[MAX_PAIRS];
static uint32_t pair_count;
static int started;

static void skip_space(void)
{
    while (pos < config_len && (config[pos] == ' ' || config[pos] == '\n' || config[pos] == '\t' || config[pos] == '\r'))
        pos++;
}

static int hex(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A JSON string at pos into out (at most MAX_TEXT bytes); its length, or -1. */
static int string(char *out)
{
    uint32_t n = 0;
    skip_space();
    if (pos >= config_len || config[pos] != '"') return -1;
    pos++;
    while (pos < config_len && config[pos] != '"') {
        char c = config[pos++];
        if (c == '\\' && pos < config_len) {
            char e = config[pos++];
            if (e == 'n') c = '\n';
            else if (e == 't') c = '\t';
            else if (e == 'u' && pos + 4 <= config_len && config[pos] == '0' && config[pos + 1] == '0') {
                int hi = hex(config[pos + 2]), lo = hex(config[pos + 3]);
                if (hi < 0 || lo < 0) return -1;
                c = (char)(hi * 16 + lo);
                pos += 4;
            } else c = e;
        }
        if (n >= MAX_TEXT) return -1;
        out[n++] = c;
    }
    if (pos >= config_len) return -1;
    pos++;
    return (int)n;
}

/* Skips any JSON value at pos (nested objects and arrays, strings, literals). */
static void skip_value(void)
{
    int depth = 0;
    char scratch[MAX_TEXT];
    skip_space();
    do {
        if (pos >= config_len) return;
        char c = config[pos];
        if (c == '"') { if (string(scratch) < 0) pos++; continue; }
        if (c == '{' || c == '[') depth++;
        else if (c == '}' || c == ']') depth--;
        else if (depth == 0 && (c == ',')) return;
        pos++;
    } while (depth > 0 || (pos < config_len && config[pos] != ',' && config[pos] != '}'));
}

static void read_headers(void)
{
    skip_space();
    if (pos >= config_len || config[pos] != '{') return;
    pos++;
    while (pair_count < MAX_PAIRS) {
        int name_len = string(pairs[pair_count].name);
        if (name_len < 0) return;
        skip_space();
        if (pos >= config_len || config[pos] != ':') return;
        pos++;
        int value_len = string(pairs[pair_count].value);
        if (value_len < 0) return;
        pairs[pair_count].name_len = (uint32_t)name_len;
        pairs[pair_count].value_len = (uint32_t)value_len;
        pair_count++;
        skip_space();
        if (pos < config_len && config[pos] == ',') { pos++; continue; }
        return;
    }
}

HH_EXPORT("_start") void start(void)
{
    char key[MAX_TEXT];
    config_len = hh_get_config(config, MAX_CONFIG);
    if (config_len > MAX_CONFIG) config_len = 0;
    pos = 0;
    skip_space();
    if (pos < config_len && config[pos] == '{') {
        pos++;
        for (;;) {
            int key_len = string(key);
            if (key_len < 0) break;
            skip_space();
            if (pos >= config_len || config[pos] != ':') break;
            pos++;
            if (key_len == 7 && hh_memeq(key, "headers", 7)) read_headers();
            else skip_value();
            skip_space();
            if (pos < config_len && config[pos] == ',') { pos++; continue; }
            break;
        }
    }
    started = 1;
    wasi_proc_exit(0); /* as TinyGo >= 0.35 ends main: the host must treat it as a clean end */
}

HH_EXPORT_HANDLE_REQUEST uint64_t handle_request(void)
{
    if (!started) hh_set_header_value(HH_HEADER_REQUEST, HH_LIT("x-not-started"), HH_LIT("1"));
    for (uint32_t i = 0; i < pair_count; i++)
        hh_set_header_value(HH_HEADER_REQUEST, pairs[i].name, pairs[i].name_len, pairs[i].value, pairs[i].value_len);
    return hh_next(0);
}

HH_NO_HANDLE_RESPONSE
