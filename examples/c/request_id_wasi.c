/*
 * request_id_wasi.c: request ids (like ../request_id.wat), built against
 * wasi-libc as a WASI reactor (it exports _initialize, which runs libc's
 * constructors, then the host calls handle_request/handle_response).
 *
 * Each request gets "req-<n>" (n counts the requests of this instance) as the
 * request header x-request-id, for the next handler, and as the response
 * header x-request-id, set in handle_request so it is part of the final
 * response. n travels to handle_response as req_ctx, which logs
 * "req-<n> status=<code>" at info level, or "req-<n> failed" at warn level.
 * At init it prints a line to stdout through libc (the WASI fd_write path).
 *
 * Build: python3 build.py --wasi request_id_wasi.c -o request_id_wasi.wasm
 */
#include <stdio.h>

#include "http_handler.h"

static uint32_t counter;

/* Run by _initialize, once per instance. stdout is fully buffered when it is
 * not a terminal, so flush for the line to reach fd_write now. */
__attribute__((constructor)) static void announce(void)
{
    printf("request_id_wasi: instance ready\n");
    fflush(stdout);
}

/* Writes "req-<n>" to buf; returns its length. */
static uint32_t format_id(char *buf, size_t size, uint32_t n)
{
    int len = snprintf(buf, size, "req-%lu", (unsigned long)n);
    return len < 0 ? 0 : (uint32_t)len;
}

HH_EXPORT_HANDLE_REQUEST uint64_t handle_request(void)
{
    char id[32];
    uint32_t n = ++counter;
    uint32_t len = format_id(id, sizeof id, n);
    hh_set_header_value(HH_HEADER_REQUEST, HH_LIT("x-request-id"), id, len);
    hh_set_header_value(HH_HEADER_RESPONSE, HH_LIT("x-request-id"), id, len);
    return hh_next(n);
}

HH_EXPORT_HANDLE_RESPONSE void handle_response(uint32_t req_ctx, uint32_t is_error)
{
    char msg[64];
    int len;
    if (is_error) {
        len = snprintf(msg, sizeof msg, "req-%lu failed", (unsigned long)req_ctx);
        hh_log(HH_LOG_WARN, msg, (uint32_t)len);
        return;
    }
    if (!hh_log_enabled(HH_LOG_INFO)) {
        return;
    }
    len = snprintf(msg, sizeof msg, "req-%lu status=%lu", (unsigned long)req_ctx,
                   (unsigned long)hh_get_status_code());
    hh_log(HH_LOG_INFO, msg, (uint32_t)len);
}
