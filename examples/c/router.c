/*
 * router.c: routing on the URI path, without libc (like ../router.wat).
 *
 *   /host...   the guest answers: 200, content-type: text/plain,
 *              "hello from the guest\n"; the next handler does not run.
 *   /api/...   "/api" is stripped ("/api/items?x=1" -> "/items?x=1"), then the
 *              next handler runs on the new URI.
 *   otherwise  the next handler runs with the request unchanged.
 *
 * Build: python3 build.py router.c -o router.wasm
 */
#include "http_handler.h"

/* Most URIs fit here; longer ones are read again into scratch memory. */
static char uri_buf[2048];

HH_EXPORT_HANDLE_REQUEST uint64_t handle_request(void)
{
    hh_value got = HH_GET(hh_get_uri, uri_buf);
    if (!got.ok) {
        /* The host wrote nothing but told us the length: retry with room. */
        void *big = hh_scratch(got.len);
        if (big == NULL) {
            __builtin_trap();
        }
        got = hh_get(hh_get_uri, big, got.len);
        if (!got.ok) {
            __builtin_trap();
        }
    }
    hh_str uri = hh_value_str(got);

    if (hh_starts_with(uri, HH_LIT("/host"))) {
        hh_set_status_code(200);
        hh_set_header_value(HH_HEADER_RESPONSE, HH_LIT("content-type"), HH_LIT("text/plain"));
        hh_write_body(HH_BODY_RESPONSE, HH_LIT("hello from the guest\n"));
        return HH_ANSWERED;
    }

    if (hh_starts_with(uri, HH_LIT("/api/"))) {
        /* Keep the "/" after "/api". */
        hh_set_uri(uri.data + 4, uri.len - 4);
    }
    return hh_next(0);
}

HH_NO_HANDLE_RESPONSE
