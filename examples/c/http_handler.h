/*
 * http_handler.h: a header-only C SDK for http-wasm guests (the `http_handler`
 * ABI), for clang's wasm32 targets.
 *
 * It needs no libc: only the compiler's own <stdint.h> and <stddef.h>. Build a
 * libc-free guest with
 *
 *     clang --target=wasm32 -O2 -nostdlib -ffreestanding -mbulk-memory \
 *           -Wl,--no-entry -o guest.wasm guest.c
 *
 * (-mbulk-memory makes __builtin_memcpy/__builtin_memset compile to the
 * memory.copy/memory.fill instructions instead of calls to a libc). The
 * header works with wasi-libc too (`--target=wasm32-wasi -mexec-model=reactor`).
 *
 * What is here:
 *   - every host function of module "http_handler", declared as hh_<name>;
 *   - the ABI constants (HH_FEATURE_*, HH_HEADER_*, HH_BODY_*, HH_LOG_*);
 *   - HH_EXPORT_HANDLE_REQUEST / HH_EXPORT_HANDLE_RESPONSE to export the two
 *     entry points, hh_next()/HH_ANSWERED to build their ctx_next result;
 *   - unpacking of count_len and eof_len results;
 *   - buf/buf_limit helpers that report whether the value fitted and its real
 *     length, and an iterator over NUL-terminated count_len lists;
 *   - small memory/string helpers (no libc);
 *   - hh_scratch(): growable scratch memory for libc-free guests.
 *
 * Strings passed to and from the host are (pointer, length) pairs, never
 * NUL-terminated; HH_LIT("text") expands to both for a string literal.
 */
#ifndef HTTP_HANDLER_H
#define HTTP_HANDLER_H

#include <stddef.h>
#include <stdint.h>

#if !defined(__wasm32__)
#error "http_handler.h is for wasm32 guests: build with clang --target=wasm32 or wasm32-wasi"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Constants                                                                */
/* ------------------------------------------------------------------------ */

/* enable_features bit flags. */
enum {
    HH_FEATURE_BUFFER_REQUEST = 1,
    HH_FEATURE_BUFFER_RESPONSE = 2,
    HH_FEATURE_TRAILERS = 4
};

/* header_kind. */
enum {
    HH_HEADER_REQUEST = 0,
    HH_HEADER_RESPONSE = 1,
    HH_HEADER_REQUEST_TRAILERS = 2,
    HH_HEADER_RESPONSE_TRAILERS = 3
};

/* body_kind. */
enum {
    HH_BODY_REQUEST = 0,
    HH_BODY_RESPONSE = 1
};

/* log_level. */
enum {
    HH_LOG_DEBUG = -1,
    HH_LOG_INFO = 0,
    HH_LOG_WARN = 1,
    HH_LOG_ERROR = 2,
    HH_LOG_NONE = 3
};

/* ------------------------------------------------------------------------ */
/* Host functions (module "http_handler")                                   */
/* ------------------------------------------------------------------------ */

#define HH_IMPORT(name) __attribute__((import_module("http_handler"), import_name(name)))

/* Enables what the host can of `features`; returns the whole enabled set.
 * At init: for every request of this guest; in handle_request: this request. */
HH_IMPORT("enable_features") uint32_t hh_enable_features(uint32_t features);

/* Getters follow the buf/buf_limit rule: the value is written at `buf` only
 * when its length is <= buf_limit; its length is returned either way. */
HH_IMPORT("get_config") uint32_t hh_get_config(void *buf, uint32_t buf_limit);

/* Logs the UTF-8 message at `level` (HH_LOG_*). Never traps. */
HH_IMPORT("log") void hh_log(int32_t level, const void *msg, uint32_t msg_len);
/* 1 if messages at `level` are logged. */
HH_IMPORT("log_enabled") int32_t hh_log_enabled(int32_t level);

HH_IMPORT("get_method") uint32_t hh_get_method(void *buf, uint32_t buf_limit);
/* An empty method traps. */
HH_IMPORT("set_method") void hh_set_method(const void *method, uint32_t method_len);

/* Path and query as sent (still percent-encoded), "/" when empty. */
HH_IMPORT("get_uri") uint32_t hh_get_uri(void *buf, uint32_t buf_limit);
/* Replaces path and query; pass it encoded. */
HH_IMPORT("set_uri") void hh_set_uri(const void *uri, uint32_t uri_len);

/* "HTTP/1.0", "HTTP/1.1" or "HTTP/2.0". */
HH_IMPORT("get_protocol_version") uint32_t hh_get_protocol_version(void *buf, uint32_t buf_limit);
/* "1.2.3.4:5678" or "[::1]:5678". */
HH_IMPORT("get_source_addr") uint32_t hh_get_source_addr(void *buf, uint32_t buf_limit);

/* Header names of `kind` (HH_HEADER_*), lowercase, each once, each
 * NUL-terminated; returns count_len. */
HH_IMPORT("get_header_names")
uint64_t hh_get_header_names(uint32_t kind, void *buf, uint32_t buf_limit);
/* All values of one header (name matched case-insensitively), in order, each
 * NUL-terminated; returns count_len. */
HH_IMPORT("get_header_values")
uint64_t hh_get_header_values(uint32_t kind, const void *name, uint32_t name_len,
                              void *buf, uint32_t buf_limit);
/* Replaces all values of the header with one. */
HH_IMPORT("set_header_value")
void hh_set_header_value(uint32_t kind, const void *name, uint32_t name_len,
                         const void *value, uint32_t value_len);
/* Appends one value. */
HH_IMPORT("add_header_value")
void hh_add_header_value(uint32_t kind, const void *name, uint32_t name_len,
                         const void *value, uint32_t value_len);
/* Removes all values. */
HH_IMPORT("remove_header")
void hh_remove_header(uint32_t kind, const void *name, uint32_t name_len);

/* Reads the next part of a body (HH_BODY_*); returns eof_len. buf_limit=0 traps. */
HH_IMPORT("read_body") uint64_t hh_read_body(uint32_t kind, void *buf, uint32_t buf_limit);
/* Appends to a body; the first write in a phase replaces the existing body. */
HH_IMPORT("write_body") void hh_write_body(uint32_t kind, const void *body, uint32_t body_len);

/* The status the next handler produced (200 by default). */
HH_IMPORT("get_status_code") uint32_t hh_get_status_code(void);
HH_IMPORT("set_status_code") void hh_set_status_code(uint32_t code);

/* ------------------------------------------------------------------------ */
/* Exports and their results                                                */
/* ------------------------------------------------------------------------ */

#define HH_EXPORT(name) __attribute__((export_name(name)))

/* Put before the definitions of the two required entry points:
 *
 *     HH_EXPORT_HANDLE_REQUEST uint64_t handle_request(void) { ... }
 *     HH_EXPORT_HANDLE_RESPONSE void handle_response(uint32_t req_ctx, uint32_t is_error) { ... }
 */
#define HH_EXPORT_HANDLE_REQUEST HH_EXPORT("handle_request")
#define HH_EXPORT_HANDLE_RESPONSE HH_EXPORT("handle_response")

/* Defines a handle_response that does nothing, for guests with no use for it. */
#define HH_NO_HANDLE_RESPONSE                                                    \
    HH_EXPORT_HANDLE_RESPONSE void handle_response(uint32_t req_ctx, uint32_t is_error) \
    {                                                                            \
        (void)req_ctx;                                                           \
        (void)is_error;                                                          \
    }

/* handle_request's result when the guest answered the request itself. */
#define HH_ANSWERED ((uint64_t)0)

/* handle_request's result to call the next handler; req_ctx comes back to
 * handle_response unchanged. */
static inline uint64_t hh_next(uint32_t req_ctx)
{
    return ((uint64_t)req_ctx << 32) | 1u;
}

/* ------------------------------------------------------------------------ */
/* Packed results                                                           */
/* ------------------------------------------------------------------------ */

/* count_len: number of NUL-terminated strings, and their length in all. */
static inline uint32_t hh_count(uint64_t count_len) { return (uint32_t)(count_len >> 32); }
static inline uint32_t hh_len(uint64_t packed) { return (uint32_t)packed; }
/* eof_len: 1 when the body is exhausted (the len bytes still count). */
static inline uint32_t hh_eof(uint64_t eof_len) { return (uint32_t)(eof_len >> 32); }

/* ------------------------------------------------------------------------ */
/* Memory and string helpers (no libc)                                      */
/* ------------------------------------------------------------------------ */

/* A string literal as the (pointer, length) argument pair the host wants. */
#define HH_LIT(s) (s), (uint32_t)(sizeof(s) - 1)

static inline void hh_memcpy(void *dst, const void *src, uint32_t n)
{
    __builtin_memcpy(dst, src, n);
}

static inline void hh_memset(void *dst, int byte, uint32_t n)
{
    __builtin_memset(dst, byte, n);
}

/* 1 if the n bytes at a and b are equal. */
static inline int hh_memeq(const void *a, const void *b, uint32_t n)
{
    const unsigned char *x = (const unsigned char *)a;
    const unsigned char *y = (const unsigned char *)b;
    for (uint32_t i = 0; i < n; i++) {
        if (x[i] != y[i]) {
            return 0;
        }
    }
    return 1;
}

/* Like hh_memeq but reads every byte whatever the differences, for secrets. */
static inline int hh_memeq_ct(const void *a, const void *b, uint32_t n)
{
    const volatile unsigned char *x = (const volatile unsigned char *)a;
    const volatile unsigned char *y = (const volatile unsigned char *)b;
    unsigned char diff = 0;
    for (uint32_t i = 0; i < n; i++) {
        diff |= (unsigned char)(x[i] ^ y[i]);
    }
    return diff == 0;
}

static inline uint32_t hh_strlen(const char *s)
{
    uint32_t n = 0;
    while (s[n] != '\0') {
        n++;
    }
    return n;
}

/* A byte string that is not NUL-terminated. */
typedef struct {
    const char *data;
    uint32_t len;
} hh_str;

static inline hh_str hh_str_make(const char *data, uint32_t len)
{
    hh_str s;
    s.data = data;
    s.len = len;
    return s;
}

static inline int hh_str_eq(hh_str s, const char *data, uint32_t len)
{
    return s.len == len && hh_memeq(s.data, data, len);
}

static inline int hh_starts_with(hh_str s, const char *prefix, uint32_t prefix_len)
{
    return s.len >= prefix_len && hh_memeq(s.data, prefix, prefix_len);
}

/* ASCII lowercase of one byte. */
static inline unsigned char hh_ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + ('a' - 'A')) : c;
}

/* Like hh_starts_with, ignoring ASCII case. */
static inline int hh_starts_with_ignore_case(hh_str s, const char *prefix, uint32_t prefix_len)
{
    if (s.len < prefix_len) {
        return 0;
    }
    for (uint32_t i = 0; i < prefix_len; i++) {
        if (hh_ascii_lower((unsigned char)s.data[i]) != hh_ascii_lower((unsigned char)prefix[i])) {
            return 0;
        }
    }
    return 1;
}

/* Logs a NUL-terminated C string. */
static inline void hh_log_cstr(int32_t level, const char *msg)
{
    hh_log(level, msg, hh_strlen(msg));
}

/* ------------------------------------------------------------------------ */
/* buf / buf_limit helpers                                                  */
/* ------------------------------------------------------------------------ */

/* What a getter returned for a caller's buffer.
 *   ok=1: the value (len bytes) is at data.
 *   ok=0: it did not fit: nothing was written, len is the size it needs;
 *         retry with a buffer of at least len bytes (hh_scratch, malloc). */
typedef struct {
    const char *data;
    uint32_t len;
    int ok;
} hh_value;

/* The getters with the (buf, buf_limit) signature. */
typedef uint32_t (*hh_getter)(void *buf, uint32_t buf_limit);

/* Calls a getter (hh_get_uri, hh_get_method, hh_get_config, ...) with `buf`
 * of `cap` bytes:  hh_value uri = hh_get(hh_get_uri, buf, sizeof buf); */
static inline hh_value hh_get(hh_getter getter, void *buf, uint32_t cap)
{
    hh_value v;
    v.data = (const char *)buf;
    v.len = getter(buf, cap);
    v.ok = v.len <= cap;
    return v;
}

/* The same for an array: HH_GET(hh_get_uri, buf). */
#define HH_GET(getter, array) hh_get((getter), (array), (uint32_t)sizeof(array))

/* A value that did fit, as a string (empty when it did not). */
static inline hh_str hh_value_str(hh_value v)
{
    return hh_str_make(v.data, v.ok ? v.len : 0);
}

/* A NUL-terminated list from a count_len getter:
 *   ok=1: count strings, len bytes in all, at data.
 *   ok=0: it did not fit: nothing was written, len is the size it needs. */
typedef struct {
    const char *data;
    uint32_t count;
    uint32_t len;
    int ok;
} hh_list;

static inline hh_list hh_list_from(uint64_t count_len, const void *buf, uint32_t cap)
{
    hh_list l;
    l.data = (const char *)buf;
    l.count = hh_count(count_len);
    l.len = hh_len(count_len);
    l.ok = l.len <= cap;
    return l;
}

/* Header names of `kind` into buf. */
static inline hh_list hh_header_names(uint32_t kind, void *buf, uint32_t cap)
{
    return hh_list_from(hh_get_header_names(kind, buf, cap), buf, cap);
}

/* All values of header `name` of `kind` into buf. */
static inline hh_list hh_header_values(uint32_t kind, const char *name, uint32_t name_len,
                                       void *buf, uint32_t cap)
{
    return hh_list_from(hh_get_header_values(kind, name, name_len, buf, cap), buf, cap);
}

/* Iterates over the strings of a list that fitted:
 *
 *     hh_iter it = hh_list_iter(list);
 *     hh_str item;
 *     while (hh_iter_next(&it, &item)) { ... item.data, item.len ... }
 *
 * A list that did not fit (ok=0) yields nothing. A last string without its
 * NUL is yielded up to the end of the list. */
typedef struct {
    const char *pos;
    const char *end;
} hh_iter;

static inline hh_iter hh_list_iter(hh_list l)
{
    hh_iter it;
    it.pos = l.data;
    it.end = l.ok ? l.data + l.len : l.data;
    return it;
}

static inline int hh_iter_next(hh_iter *it, hh_str *out)
{
    const char *start = it->pos;
    const char *p = start;
    if (start >= it->end) {
        return 0;
    }
    while (p < it->end && *p != '\0') {
        p++;
    }
    *out = hh_str_make(start, (uint32_t)(p - start));
    it->pos = (p < it->end) ? p + 1 : p;
    return 1;
}

/* The first value of a header. ok=0 when it is absent (len=0) or when the
 * values did not fit (len is the size they need). */
static inline hh_value hh_header_first(uint32_t kind, const char *name, uint32_t name_len,
                                       void *buf, uint32_t cap)
{
    hh_list l = hh_header_values(kind, name, name_len, buf, cap);
    hh_iter it = hh_list_iter(l);
    hh_str first;
    hh_value v;
    v.data = (const char *)buf;
    v.len = l.len;
    v.ok = 0;
    if (l.count > 0 && hh_iter_next(&it, &first)) {
        v.data = first.data;
        v.len = first.len;
        v.ok = 1;
    }
    return v;
}

/* ------------------------------------------------------------------------ */
/* Scratch memory for libc-free guests                                      */
/* ------------------------------------------------------------------------ */

/* Returns at least `size` bytes of scratch memory, or NULL if memory cannot
 * grow. There is one scratch area per instance, taken from memory.grow and
 * reused by every call (each call may move it and invalidates what the last
 * returned). Use it to retry a getter whose value did not fit a static
 * buffer. Libc-free guests only: with libc, malloc owns memory.grow. */
static inline void *hh_scratch(uint32_t size)
{
    static char *area;
    static uint32_t area_size;
    if (area != NULL && size <= area_size) {
        return area;
    }
    uint32_t pages = (size >> 16) + 1;
    size_t old_pages = __builtin_wasm_memory_grow(0, pages);
    if (old_pages == (size_t)-1) {
        return NULL;
    }
    char *grown = (char *)(old_pages << 16);
    if (area != NULL && area + area_size == grown) {
        /* The new pages follow the old area: extend it. */
        area_size += pages << 16;
    } else {
        /* First use, or something else grew memory since: start afresh
         * (the old area is abandoned). */
        area = grown;
        area_size = pages << 16;
    }
    return area;
}

#ifdef __cplusplus
}
#endif

#endif /* HTTP_HANDLER_H */
