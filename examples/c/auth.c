/*
 * auth.c: HTTP Basic authentication, without libc (like ../auth.wat).
 *
 * The guest config is the expected credential in plain text, "user:password".
 * The guest base64-encodes it once per instance; a request passes (next=1)
 * only with exactly one "Authorization: Basic <that token>" header, the scheme
 * name in any case. Anything else gets 401 with
 * www-authenticate: Basic realm="httpwasm" and the body "unauthorized\n".
 * An empty or over-long (> 1024 bytes) config is logged and traps: fail closed.
 *
 * Build: python3 build.py auth.c -o auth.wasm
 */
#include "http_handler.h"

#define CONFIG_MAX 1024

static char config[CONFIG_MAX];
/* base64 turns each started group of 3 bytes into 4. */
static char expected[(CONFIG_MAX + 2) / 3 * 4];
static uint32_t expected_len;
static int ready;

/* The Authorization header value(s), NUL-terminated. */
static char header_buf[8192];

static const char BASE64_ALPHABET[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Base64-encodes len bytes of src to dst, with "=" padding; returns the
 * number of bytes written. */
static uint32_t base64_encode(const unsigned char *src, uint32_t len, char *dst)
{
    uint32_t in = 0;
    uint32_t out = 0;
    /* Whole groups: 3 bytes in, 4 digits out. */
    for (; in + 3 <= len; in += 3) {
        uint32_t bits = (uint32_t)src[in] << 16 | (uint32_t)src[in + 1] << 8 | src[in + 2];
        dst[out++] = BASE64_ALPHABET[(bits >> 18) & 63];
        dst[out++] = BASE64_ALPHABET[(bits >> 12) & 63];
        dst[out++] = BASE64_ALPHABET[(bits >> 6) & 63];
        dst[out++] = BASE64_ALPHABET[bits & 63];
    }
    /* The tail: 1 byte -> 2 digits + "==", 2 bytes -> 3 digits + "=". */
    uint32_t rest = len - in;
    if (rest > 0) {
        uint32_t bits = (uint32_t)src[in] << 16;
        if (rest == 2) {
            bits |= (uint32_t)src[in + 1] << 8;
        }
        dst[out++] = BASE64_ALPHABET[(bits >> 18) & 63];
        dst[out++] = BASE64_ALPHABET[(bits >> 12) & 63];
        dst[out++] = rest == 2 ? BASE64_ALPHABET[(bits >> 6) & 63] : '=';
        dst[out++] = '=';
    }
    return out;
}

/* Reads the config and computes the expected token, once per instance. */
static void init(void)
{
    if (ready) {
        return;
    }
    hh_value cfg = HH_GET(hh_get_config, config);
    if (cfg.len == 0 || !cfg.ok) {
        hh_log(HH_LOG_ERROR,
               HH_LIT("auth: the guest config must be user:password, 1 to 1024 bytes"));
        __builtin_trap();
    }
    expected_len = base64_encode((const unsigned char *)cfg.data, cfg.len, expected);
    ready = 1;
}

/* Init when the host creates the instance; handle_request checks again in
 * case a host does not call it. */
HH_EXPORT("_initialize") void guest_initialize(void)
{
    init();
}

/* 1 if the request has exactly one Authorization header, "Basic <expected>". */
static int is_authorized(void)
{
    hh_list values = hh_header_values(HH_HEADER_REQUEST, HH_LIT("authorization"),
                                      header_buf, sizeof header_buf);
    /* A value too long for the buffer is far longer than any accepted token. */
    if (values.count != 1 || !values.ok) {
        return 0;
    }
    hh_iter it = hh_list_iter(values);
    hh_str value;
    if (!hh_iter_next(&it, &value)) {
        return 0;
    }
    /* "Basic", any case, then at least one space, then the token. */
    if (!hh_starts_with_ignore_case(value, HH_LIT("basic"))) {
        return 0;
    }
    uint32_t pos = 5;
    if (pos >= value.len || value.data[pos] != ' ') {
        return 0;
    }
    while (pos < value.len && value.data[pos] == ' ') {
        pos++;
    }
    uint32_t token_len = value.len - pos;
    return token_len == expected_len && hh_memeq_ct(value.data + pos, expected, expected_len);
}

HH_EXPORT_HANDLE_REQUEST uint64_t handle_request(void)
{
    init();
    if (is_authorized()) {
        return hh_next(0);
    }
    /* Refuse with a whole 401 response from the guest. */
    hh_set_status_code(401);
    hh_set_header_value(HH_HEADER_RESPONSE, HH_LIT("www-authenticate"),
                        HH_LIT("Basic realm=\"httpwasm\""));
    hh_set_header_value(HH_HEADER_RESPONSE, HH_LIT("content-type"), HH_LIT("text/plain"));
    hh_write_body(HH_BODY_RESPONSE, HH_LIT("unauthorized\n"));
    return HH_ANSWERED;
}

HH_NO_HANDLE_RESPONSE
