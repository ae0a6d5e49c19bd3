/*
 * isolation.c: reports what a guest can see through WASI, for tests/test_isolation.py.
 *
 * Built at test time against wasi-libc as a WASI reactor (examples/c/build.py
 * --wasi). Every request is answered by the guest itself (200, empty body);
 * response headers say what it found. Request headers choose what to probe:
 *
 *   x-env: NAME     ->  x-env-value: getenv(NAME), or "(unset)"
 *   x-read: PATH    ->  x-read-result: "ok:" + the file's first bytes, or "error:" + strerror
 *   x-write: PATH   ->  x-write-result: "ok" after writing "written by the guest", or "error:..."
 *   x-list: PATH    ->  x-list-result: "ok:" + number of entries, or "error:..."
 *
 * and always:
 *
 *   x-argc         the number of WASI arguments
 *   x-environ      the number of WASI environment variables
 *   x-fds          how many file descriptors past stdin/stdout/stderr are open (preopens, sockets)
 *   x-preopens     the names of the preopened directories, comma-separated, or "(none)"
 *   x-stdin        what reading stdin gives: "eof", "error:...", or "data" (the host's stdin leaked)
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <wasi/api.h>

#include "http_handler.h"

static void reply(const char *name, const char *value)
{
    hh_set_header_value(HH_HEADER_RESPONSE, name, (uint32_t)strlen(name), value, (uint32_t)strlen(value));
}

static void reply_number(const char *name, unsigned long value)
{
    char text[32];
    snprintf(text, sizeof text, "%lu", value);
    reply(name, text);
}

static void reply_error(const char *name, int error)
{
    char text[128];
    snprintf(text, sizeof text, "error:%s", strerror(error));
    reply(name, text);
}

/* The first value of request header `name`, NUL-terminated in buf, or NULL when absent. */
static const char *request_header(const char *name, char *buf, uint32_t cap)
{
    hh_value v = hh_header_first(HH_HEADER_REQUEST, name, (uint32_t)strlen(name), buf, cap - 1);
    if (!v.ok) {
        return NULL;
    }
    memmove(buf, v.data, v.len);
    buf[v.len] = '\0';
    return buf;
}

/* Header values may not hold control bytes: show them as '?'. */
static void printable(char *text)
{
    for (; *text; text++) {
        if ((unsigned char)*text < 0x20 || (unsigned char)*text == 0x7f) {
            *text = '?';
        }
    }
}

static void probe_env(const char *name)
{
    const char *value = getenv(name);
    reply("x-env-value", value ? value : "(unset)");
}

static void probe_read(const char *path)
{
    char text[256] = "ok:";
    FILE *file = fopen(path, "r");
    if (!file) {
        reply_error("x-read-result", errno);
        return;
    }
    size_t n = fread(text + 3, 1, sizeof text - 4, file);
    int failed = ferror(file) ? errno : 0;
    fclose(file);
    if (failed) {
        reply_error("x-read-result", failed);
        return;
    }
    text[3 + n] = '\0';
    printable(text);
    reply("x-read-result", text);
}

static void probe_write(const char *path)
{
    FILE *file = fopen(path, "w");
    if (!file) {
        reply_error("x-write-result", errno);
        return;
    }
    int ok = fputs("written by the guest", file) >= 0;
    int error = errno;
    if (fclose(file) != 0) {
        ok = 0;
        error = errno;
    }
    if (ok) {
        reply("x-write-result", "ok");
    } else {
        reply_error("x-write-result", error);
    }
}

static void probe_list(const char *path)
{
    DIR *dir = opendir(path);
    if (!dir) {
        reply_error("x-list-result", errno);
        return;
    }
    unsigned long entries = 0;
    while (readdir(dir)) {
        entries++;
    }
    closedir(dir);
    char text[32];
    snprintf(text, sizeof text, "ok:%lu", entries);
    reply("x-list-result", text);
}

static void report_wasi(void)
{
    __wasi_size_t count = 0, size = 0;
    reply_number("x-argc", __wasi_args_sizes_get(&count, &size) == 0 ? count : 9999);
    reply_number("x-environ", __wasi_environ_sizes_get(&count, &size) == 0 ? count : 9999);

    char preopens[512] = "";
    unsigned long fds = 0;
    for (__wasi_fd_t fd = 3; fd < 64; fd++) {
        __wasi_fdstat_t stat;
        if (__wasi_fd_fdstat_get(fd, &stat) != 0) {
            continue;
        }
        fds++;
        __wasi_prestat_t prestat;
        if (__wasi_fd_prestat_get(fd, &prestat) == 0 && prestat.tag == __WASI_PREOPENTYPE_DIR) {
            char name[128];
            size_t len = prestat.u.dir.pr_name_len;
            if (len < sizeof name && __wasi_fd_prestat_dir_name(fd, (uint8_t *)name, len) == 0) {
                name[len] = '\0';
                if (preopens[0]) {
                    strncat(preopens, ",", sizeof preopens - strlen(preopens) - 1);
                }
                strncat(preopens, name, sizeof preopens - strlen(preopens) - 1);
            }
        }
    }
    reply_number("x-fds", fds);
    reply("x-preopens", preopens[0] ? preopens : "(none)");

    char byte;
    ssize_t got = read(0, &byte, 1);
    if (got == 0) {
        reply("x-stdin", "eof");
    } else if (got < 0) {
        reply_error("x-stdin", errno);
    } else {
        reply("x-stdin", "data");
    }
}

HH_EXPORT_HANDLE_REQUEST uint64_t handle_request(void)
{
    char buf[1024];
    const char *value;
    if ((value = request_header("x-env", buf, sizeof buf))) {
        probe_env(value);
    }
    if ((value = request_header("x-read", buf, sizeof buf))) {
        probe_read(value);
    }
    if ((value = request_header("x-write", buf, sizeof buf))) {
        probe_write(value);
    }
    if ((value = request_header("x-list", buf, sizeof buf))) {
        probe_list(value);
    }
    report_wasi();
    return HH_ANSWERED;
}

HH_NO_HANDLE_RESPONSE
