/*
 * The optional compiled accelerator of the guest-call path (see runtime/accel.py).
 *
 * It calls guest exports through wasmtime's C API, and answers the common
 * http_handler host functions in C, over a per-call snapshot of the request
 * taken before the call; what the guest changes is recorded here and applied
 * by the Python side after the call (or before any host function that only
 * Python answers).  Everything else, and every failure, is answered by the
 * pure-Python implementation through the same ctypes callback the pure path
 * registers, so results and trap reasons are the pure path's, byte for byte.
 *
 * The wasmtime functions are resolved with dlsym() from the library that
 * wasmtime-py already loaded; their declarations are written here, for the
 * wasmtime majors in DECLARED_MAJORS, and setup() refuses any other major.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* -- wasmtime's C API, as wasmtime 50 and 51 declare it ------------------------------- */

static const long DECLARED_MAJORS[] = {50, 51};

typedef struct wasmtime_error wasmtime_error_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasmtime_caller wasmtime_caller_t;
typedef struct wasmtime_context wasmtime_context_t;
typedef struct wasmtime_func wasmtime_func_t;     /* only its address is passed */
typedef struct wasmtime_memory wasmtime_memory_t; /* only its address is passed */
typedef struct wasmtime_store wasmtime_store_t;
typedef uint8_t wasmtime_update_deadline_kind_t;
#define WASMTIME_UPDATE_DEADLINE_CONTINUE 0
typedef wasmtime_error_t *(*epoch_callback_t)(wasmtime_context_t *, void *, uint64_t *,
                                              wasmtime_update_deadline_kind_t *);

/* wasmtime_val_raw_t: a 16-byte union (it can hold a v128); i32 and i64 sit at offset 0. */
typedef union {
    int32_t i32;
    int64_t i64;
    uint8_t v128[16];
} raw_slot;

typedef wasm_trap_t *(*unchecked_callback_t)(void *env, wasmtime_caller_t *caller, raw_slot *slots, size_t n);

static wasmtime_error_t *(*w_func_call_unchecked)(wasmtime_context_t *, const wasmtime_func_t *, raw_slot *, size_t,
                                                  wasm_trap_t **);
static void (*w_set_epoch_deadline)(wasmtime_context_t *, uint64_t);
static uint8_t *(*w_memory_data)(const wasmtime_context_t *, const wasmtime_memory_t *);
static size_t (*w_memory_data_size)(const wasmtime_context_t *, const wasmtime_memory_t *);
static void (*w_store_epoch_deadline_callback)(wasmtime_store_t *, epoch_callback_t, void *, void (*)(void *));
static wasmtime_error_t *(*w_error_new)(const char *);
static void (*w_error_delete)(wasmtime_error_t *);

static int ready = 0;
static PyObject *sync_hook;  /* sync_hook(instance): apply what the call recorded so far */
static PyObject *error_hook; /* error_hook(address) -> the exception for a wasmtime_error_t */
static PyObject *trap_hook;  /* trap_hook(address) -> the exception for a wasm_trap_t */
static PyObject *timeout_hook; /* timeout_hook() -> the exception for a call past its time limit */
static PyObject *request_phase;
/* The fast call (call_request/call_response): set by setup_calls(). */
static PyObject *current_local; /* native.current: the thread's running target, for the pure host functions */
static PyObject *engine_globals; /* engine's module dict: serving, calls_may_hold_gil */
static PyObject *no_observer;    /* observe.NO_OBSERVER */
static PyObject *s_accel, *s_guest, *s_observer, *s_state, *s_target, *s_serving, *s_calls_may_hold_gil,
    *s_request_call, *s_handle_response, *s_end_fast_call;

static PyObject *s_phase, *s_features, *s_method, *s_uri, *s_status, *s_max_buffer_bytes, *s_response_headers,
    *s_request_header_values, *s_request_headers, *s_read_request_headers, *s_entries, *s_inline, *s_messages,
    *s_bytes, *s_dropped, *s_dropped_bytes,
    *s_log_level;

/* -- host function ids: the order of runtime/accel.py's HOST_IDS ----------------------- */

enum {
    H_ENABLE_FEATURES,
    H_GET_CONFIG,
    H_LOG,
    H_LOG_ENABLED,
    H_GET_METHOD,
    H_SET_METHOD,
    H_GET_URI,
    H_SET_URI,
    H_GET_PROTOCOL_VERSION,
    H_GET_SOURCE_ADDR,
    H_GET_HEADER_NAMES,
    H_GET_HEADER_VALUES,
    H_SET_HEADER_VALUE,
    H_ADD_HEADER_VALUE,
    H_REMOVE_HEADER,
    H_READ_BODY,
    H_WRITE_BODY,
    H_GET_STATUS_CODE,
    H_SET_STATUS_CODE,
    H_COUNT
};

/* What a host function answered in C. */
enum { DONE, READ_IN_PYTHON, SYNC_THEN_PYTHON };

#define U32(x) ((uint64_t)(uint32_t)(x))
#define MAX_LOG_MESSAGE (16 * 1024)
#define LOG_NONE 3
#define FEATURES_SUPPORTED 3
#define KIND_REQUEST 0
#define KIND_RESPONSE 1

/* -- small buffers --------------------------------------------------------------------- */

typedef struct {
    int level;
    char *data;
    size_t len;
    size_t more;
} log_line;

typedef struct {
    char *name;
    size_t name_len;
    char *value;
    size_t value_len;
} header;

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    const char *value;
    Py_ssize_t value_len;
} header_view;

/* -- the per-instance context ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    wasmtime_context_t *context;
    wasmtime_memory_t *memory;
    PyObject *memory_owner; /* keeps the wasmtime_memory_t that `memory` points into alive */
    PyObject *config;    /* bytes */
    PyObject *call_log;  /* the instance's CallLog */
    long log_messages_limit;
    long long log_bytes_limit;
    unsigned long imports; /* bit H_x: the guest imports that function (what begin() snapshots follows) */
    /* the call in progress */
    PyObject *instance; /* borrowed, during a call */
    PyObject *state; /* borrowed, during a call: the request's state (request headers may be read from it) */
    PyObject *method, *uri, *request_headers; /* owned, during a call */
    Py_ssize_t n_request_headers;
    header_view *request_header_views;
    Py_ssize_t request_header_capacity;
    int has_request_headers;
    int by_name; /* no snapshot of the request headers: read by name, under the GIL, when the guest asks */
    int request_phase;
    int response_owned;
    int python_mode;
    long log_level;
    long features, features_at_start;
    long status;
    long long max_buffer_bytes; /* -1: no limit */
    long messages, messages_at_start;
    long long bytes, dropped_bytes, bytes_at_start, dropped_bytes_at_start;
    long dropped, dropped_at_start;
    log_line *lines;
    size_t n_lines, lines_capacity;
    header *headers;
    size_t n_headers, headers_capacity;
    long long headers_size;
    int headers_changed;
    /* the time limit and the GIL, during a call (see on_deadline) */
    double call_started, call_limit;
    int may_release_gil, timed_out;
    PyThreadState *released;
    /* read by Python after a call: whether take() has anything */
    int pending;
    /* the fast call (see call_request): its exports, and whether the call made sets the thread's target lazily */
    PyObject *request_export, *response_export;
    int fast_call, target_set;
} Context;

static _Thread_local Context *current_call = NULL;

/* -- guest memory, bounds-checked against its current size -------------------------------- */

static uint8_t *memory_span(Context *c, uint64_t ptr, uint64_t len) {
    size_t size = w_memory_data_size(c->context, c->memory);
    if (ptr + len > (uint64_t)size) return NULL;
    uint8_t *base = w_memory_data(c->context, c->memory);
    if (base == NULL) return len == 0 && ptr == 0 ? (uint8_t *)"" : NULL;
    return base + ptr;
}

static int write_value(Context *c, int32_t buf, int32_t buf_limit, const char *value, size_t len, raw_slot *slots) {
    if (len <= U32(buf_limit)) {
        uint8_t *at = memory_span(c, U32(buf), len);
        if (at == NULL) return SYNC_THEN_PYTHON; /* Python traps with the reason */
        if (len) memcpy(at, value, len);
    }
    slots[0].i32 = (int32_t)len;
    return DONE;
}

static const unsigned char TOKEN[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1, ['-'] = 1, ['.'] = 1,
    ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1, ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1,
    ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1,
    ['F'] = 1, ['G'] = 1, ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1,
    ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1,
    ['Z'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1,
    ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1,
    ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

static inline unsigned char lower(unsigned char ch) { return (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch; }

static int same_name(const char *a, size_t a_len, const char *b, size_t b_len) {
    if (a_len != b_len) return 0;
    for (size_t i = 0; i < a_len; i++)
        if (lower((unsigned char)a[i]) != lower((unsigned char)b[i])) return 0;
    return 1;
}

/* -- the host functions answered in C ---------------------------------------------------- */

static int h_log(Context *c, raw_slot *slots) {
    int32_t level = slots[0].i32;
    if (!(c->log_level <= level && level < LOG_NONE)) return DONE;
    uint64_t length = U32(slots[2].i32);
    uint8_t *at = memory_span(c, U32(slots[1].i32), length);
    if (at == NULL) return DONE; /* outside memory: not logged, as if reading it had failed */
    /* CallLog.room */
    if (c->messages >= c->log_messages_limit || c->bytes >= c->log_bytes_limit) {
        c->dropped += 1;
        c->dropped_bytes += (long long)length;
        c->pending = 1;
        return DONE;
    }
    long long room = c->log_bytes_limit - c->bytes;
    if ((long long)length < room) room = (long long)length;
    c->messages += 1;
    c->bytes += room;
    c->pending = 1;
    size_t kept = room < MAX_LOG_MESSAGE ? (size_t)room : MAX_LOG_MESSAGE;
    if (c->n_lines == c->lines_capacity) {
        size_t capacity = c->lines_capacity ? c->lines_capacity * 2 : 8;
        log_line *grown = realloc(c->lines, capacity * sizeof(log_line));
        if (grown == NULL) return DONE; /* a failure to log is ignored */
        c->lines = grown;
        c->lines_capacity = capacity;
    }
    char *copy = malloc(kept ? kept : 1);
    if (copy == NULL) return DONE;
    memcpy(copy, at, kept);
    int clamped = level > 2 ? 2 : (level < -1 ? -1 : level);
    c->lines[c->n_lines++] = (log_line){clamped, copy, kept, (size_t)length - kept};
    return DONE;
}

/* Request header values in a call that runs inline (begin() took no copy of them: see c->by_name): read
 * from the request when the guest asks, one name at a time, through the same method the pure path's
 * get_header_values reads them with (state.request_header_values), so that a guest that never reads a
 * request header costs no copy of them, and one that reads one costs no copy of the rest.  The values
 * are written to guest memory here, under the pure path's buf/buf_limit rule. */
static int h_get_request_header_values(Context *c, raw_slot *slots) {
    if (c->state == NULL) return READ_IN_PYTHON;
    uint64_t name_len = U32(slots[2].i32);
    uint8_t *name = memory_span(c, U32(slots[1].i32), name_len);
    if (name == NULL || name_len == 0) return SYNC_THEN_PYTHON; /* Python traps with the reason */
    int answered = READ_IN_PYTHON;
    PyGILState_STATE gil = PyGILState_Ensure(); /* held already inline; taken back in thread mode */
    PyObject *key = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)name_len);
    PyObject *values = key ? PyObject_CallMethodOneArg(c->state, s_request_header_values, key) : NULL;
    Py_XDECREF(key);
    if (values == NULL || !PyList_CheckExact(values)) {
        PyErr_Clear(); /* Python answers again, and fails the same way */
        goto done;
    }
    Py_ssize_t count = PyList_GET_SIZE(values);
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        if (!PyBytes_Check(value)) goto done;
        total += (uint64_t)PyBytes_GET_SIZE(value) + 1;
    }
    if (count && total <= U32(slots[4].i32)) {
        uint8_t *out = memory_span(c, U32(slots[3].i32), total);
        if (out == NULL) goto done; /* Python traps with the reason */
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *value = PyList_GET_ITEM(values, i);
            size_t len = (size_t)PyBytes_GET_SIZE(value);
            memcpy(out, PyBytes_AS_STRING(value), len);
            out[len] = 0;
            out += len + 1;
        }
    }
    slots[0].i64 = count ? (int64_t)(((uint64_t)count << 32) | total) : 0;
    answered = DONE;
done:
    Py_XDECREF(values);
    PyGILState_Release(gil);
    return answered;
}

static int h_get_header_values(Context *c, raw_slot *slots) {
    int32_t kind = slots[0].i32;
    if (kind == KIND_REQUEST) {
        if (!c->has_request_headers) return c->by_name ? h_get_request_header_values(c, slots) : READ_IN_PYTHON;
    } else if (kind != KIND_RESPONSE || !c->response_owned) {
        return SYNC_THEN_PYTHON;
    }
    uint64_t name_len = U32(slots[2].i32);
    uint8_t *name = memory_span(c, U32(slots[1].i32), name_len);
    if (name == NULL || name_len == 0) return SYNC_THEN_PYTHON;
    uint64_t count = 0, total = 0;
    if (kind == KIND_REQUEST) {
        for (Py_ssize_t i = 0; i < c->n_request_headers; i++) {
            header_view *h = &c->request_header_views[i];
            if (same_name(h->name, (size_t)h->name_len, (const char *)name, name_len)) {
                count++;
                total += (uint64_t)h->value_len + 1;
            }
        }
    } else {
        for (size_t i = 0; i < c->n_headers; i++) {
            header *h = &c->headers[i];
            if (same_name(h->name, h->name_len, (const char *)name, name_len)) {
                count++;
                total += h->value_len + 1;
            }
        }
    }
    if (count == 0) {
        slots[0].i64 = 0;
        return DONE;
    }
    if (total <= U32(slots[4].i32)) {
        uint8_t *out = memory_span(c, U32(slots[3].i32), total);
        if (out == NULL) return kind == KIND_REQUEST ? READ_IN_PYTHON : SYNC_THEN_PYTHON;
        /* the name was read from guest memory that the values may overlap: match first, then write */
        uint8_t *lowered = malloc(name_len);
        if (lowered == NULL) return kind == KIND_REQUEST ? READ_IN_PYTHON : SYNC_THEN_PYTHON;
        for (uint64_t i = 0; i < name_len; i++) lowered[i] = lower(name[i]);
        char *scratch = malloc(total);
        if (scratch == NULL) {
            free(lowered);
            return kind == KIND_REQUEST ? READ_IN_PYTHON : SYNC_THEN_PYTHON;
        }
        size_t at = 0;
        if (kind == KIND_REQUEST) {
            for (Py_ssize_t i = 0; i < c->n_request_headers; i++) {
                header_view *h = &c->request_header_views[i];
                if (same_name(h->name, (size_t)h->name_len, (const char *)lowered, name_len)) {
                    memcpy(scratch + at, h->value, (size_t)h->value_len);
                    at += (size_t)h->value_len;
                    scratch[at++] = 0;
                }
            }
        } else {
            for (size_t i = 0; i < c->n_headers; i++) {
                header *h = &c->headers[i];
                if (same_name(h->name, h->name_len, (const char *)lowered, name_len)) {
                    memcpy(scratch + at, h->value, h->value_len);
                    at += h->value_len;
                    scratch[at++] = 0;
                }
            }
        }
        memcpy(out, scratch, total);
        free(scratch);
        free(lowered);
    }
    slots[0].i64 = (int64_t)((count << 32) | total);
    return DONE;
}

static int h_change_header(Context *c, raw_slot *slots, int replace) {
    if (slots[0].i32 != KIND_RESPONSE || !c->response_owned) return SYNC_THEN_PYTHON;
    uint64_t name_len = U32(slots[2].i32), value_len = U32(slots[4].i32);
    uint8_t *name = memory_span(c, U32(slots[1].i32), name_len);
    if (name == NULL || name_len == 0) return SYNC_THEN_PYTHON;
    uint8_t *value = memory_span(c, U32(slots[3].i32), value_len);
    if (value == NULL) return SYNC_THEN_PYTHON;
    for (uint64_t i = 0; i < name_len; i++)
        if (!TOKEN[name[i]]) return SYNC_THEN_PYTHON;
    for (uint64_t i = 0; i < value_len; i++)
        if (value[i] == 0 || value[i] == '\r' || value[i] == '\n') return SYNC_THEN_PYTHON;
    long long added = c->headers_size + (long long)name_len + (long long)value_len;
    if (c->max_buffer_bytes >= 0 && added > c->max_buffer_bytes) return SYNC_THEN_PYTHON; /* Python decides */
    if (c->n_headers == c->headers_capacity) {
        size_t capacity = c->headers_capacity ? c->headers_capacity * 2 : 4;
        header *grown = realloc(c->headers, capacity * sizeof(header));
        if (grown == NULL) return SYNC_THEN_PYTHON;
        c->headers = grown;
        c->headers_capacity = capacity;
    }
    char *name_copy = malloc(name_len);
    char *value_copy = malloc(value_len ? value_len : 1);
    if (name_copy == NULL || value_copy == NULL) {
        free(name_copy);
        free(value_copy);
        return SYNC_THEN_PYTHON;
    }
    for (uint64_t i = 0; i < name_len; i++) name_copy[i] = (char)lower(name[i]);
    memcpy(value_copy, value, value_len);
    if (replace) {
        size_t kept = 0;
        for (size_t i = 0; i < c->n_headers; i++) {
            header *h = &c->headers[i];
            if (h->name_len == name_len && memcmp(h->name, name_copy, name_len) == 0) {
                c->headers_size -= (long long)(h->name_len + h->value_len);
                free(h->name);
                free(h->value);
            } else {
                c->headers[kept++] = *h;
            }
        }
        c->n_headers = kept;
    }
    c->headers[c->n_headers++] = (header){name_copy, name_len, value_copy, value_len};
    c->headers_size += (long long)(name_len + value_len);
    c->headers_changed = 1;
    c->pending = 1;
    return DONE;
}

static int answer(Context *c, int id, raw_slot *slots) {
    switch (id) {
    case H_LOG_ENABLED: {
        int32_t level = slots[0].i32;
        slots[0].i32 = (c->log_level <= level && level < LOG_NONE) ? 1 : 0;
        return DONE;
    }
    case H_LOG:
        return h_log(c, slots);
    case H_ENABLE_FEATURES: {
        long wanted = slots[0].i32 & FEATURES_SUPPORTED;
        if (c->request_phase && (c->features | wanted) != c->features) {
            c->features |= wanted;
            c->pending = 1;
        }
        slots[0].i32 = (int32_t)c->features;
        return DONE;
    }
    case H_GET_CONFIG:
        return write_value(c, slots[0].i32, slots[1].i32, PyBytes_AS_STRING(c->config),
                           (size_t)PyBytes_GET_SIZE(c->config), slots);
    case H_GET_METHOD:
        return write_value(c, slots[0].i32, slots[1].i32, PyBytes_AS_STRING(c->method),
                           (size_t)PyBytes_GET_SIZE(c->method), slots);
    case H_GET_URI:
        return write_value(c, slots[0].i32, slots[1].i32, PyBytes_AS_STRING(c->uri), (size_t)PyBytes_GET_SIZE(c->uri),
                           slots);
    case H_GET_STATUS_CODE:
        slots[0].i32 = (int32_t)c->status;
        return DONE;
    case H_GET_HEADER_VALUES:
        return h_get_header_values(c, slots);
    case H_SET_HEADER_VALUE:
        return h_change_header(c, slots, 1);
    case H_ADD_HEADER_VALUE:
        return h_change_header(c, slots, 0);
    case H_GET_PROTOCOL_VERSION:
    case H_GET_SOURCE_ADDR:
        return READ_IN_PYTHON; /* read from the request on first use: nothing recorded here changes them */
    case H_GET_HEADER_NAMES:
        return slots[0].i32 == KIND_REQUEST ? READ_IN_PYTHON : SYNC_THEN_PYTHON;
    default:
        return SYNC_THEN_PYTHON;
    }
}

/* -- the callback every http_handler function is defined with ------------------------- */

typedef struct {
    PyObject_HEAD
    int id;
    size_t (*fallback)(void *, void *, void *, size_t); /* the pure path's ctypes callback */
    PyObject *fallback_owner;
} HostEnv;

/* A fast call sets the thread's target (native.current.target) only when Python is about to run in it. */
static void set_target(Context *c) {
    if (!c->fast_call || c->target_set) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (PyObject_SetAttr(current_local, s_target, c->instance) < 0) PyErr_WriteUnraisable(current_local);
    else c->target_set = 1;
    PyGILState_Release(gil);
}

static int sync_call(Context *c) {
    /* Apply what was recorded so far to the Python objects, then let Python answer the rest of the call. */
    int ok = 1;
    c->python_mode = 1;
    if (!c->pending) return ok;
    set_target(c);
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallOneArg(sync_hook, c->instance);
    if (result == NULL) {
        PyErr_WriteUnraisable(sync_hook);
        ok = 0;
    }
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return ok;
}

static wasm_trap_t *host_callback(void *env, wasmtime_caller_t *caller, raw_slot *slots, size_t n) {
    HostEnv *host = (HostEnv *)env;
    Context *c = current_call;
    if (c != NULL && !c->python_mode) {
        int answered = answer(c, host->id, slots);
        if (answered == DONE) return NULL;
        if (answered == SYNC_THEN_PYTHON) sync_call(c); /* a failed sync is reported; Python answers anyway */
    }
    if (c != NULL) set_target(c);
    return (wasm_trap_t *)host->fallback(NULL, caller, slots, n);
}

static PyObject *HostEnv_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    int id;
    unsigned long long fallback;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "iKO", &id, &fallback, &owner)) return NULL;
    if (id < 0 || id >= H_COUNT || fallback == 0) {
        PyErr_SetString(PyExc_ValueError, "bad host function id or fallback");
        return NULL;
    }
    HostEnv *self = (HostEnv *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->id = id;
    self->fallback = (size_t(*)(void *, void *, void *, size_t))(uintptr_t)fallback;
    Py_INCREF(owner);
    self->fallback_owner = owner;
    return (PyObject *)self;
}

static void HostEnv_dealloc(HostEnv *self) {
    Py_XDECREF(self->fallback_owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *HostEnv_address(HostEnv *self, PyObject *unused) { return PyLong_FromVoidPtr(self); }

static PyMethodDef HostEnv_methods[] = {
    {"address", (PyCFunction)HostEnv_address, METH_NOARGS, "The env pointer to define the host function with."},
    {NULL}};

static PyTypeObject HostEnvType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.runtime._accel.HostEnv",
    .tp_basicsize = sizeof(HostEnv),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = HostEnv_new,
    .tp_dealloc = (destructor)HostEnv_dealloc,
    .tp_methods = HostEnv_methods,
    .tp_doc = "HostEnv(id, fallback_address, fallback_owner): one http_handler function of one linker.",
};

/* -- exports ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    wasmtime_context_t *context;
    const wasmtime_func_t *func;
    PyObject *owner; /* keeps the wasmtime_func_t alive */
    raw_slot *slots;
    size_t count;
    int n_params;
    double limit; /* seconds */
} Export;

static PyObject *Export_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    unsigned long long context, func;
    double limit;
    int n_params, n_results;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "KKiidO", &context, &func, &n_params, &n_results, &limit, &owner)) return NULL;
    if (!context || !func || n_params < 0 || n_params > 8 || n_results < 0 || n_results > 8) {
        PyErr_SetString(PyExc_ValueError, "bad export");
        return NULL;
    }
    Export *self = (Export *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->count = (size_t)(n_params > n_results ? n_params : n_results);
    if (self->count == 0) self->count = 1;
    self->slots = calloc(self->count, sizeof(raw_slot));
    if (self->slots == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->context = (wasmtime_context_t *)(uintptr_t)context;
    self->func = (const wasmtime_func_t *)(uintptr_t)func;
    self->n_params = n_params;
    self->limit = limit;
    Py_INCREF(owner);
    self->owner = owner;
    return (PyObject *)self;
}

static void Export_dealloc(Export *self) {
    free(self->slots);
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject ExportType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.runtime._accel.Export",
    .tp_basicsize = sizeof(Export),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Export_new,
    .tp_dealloc = (destructor)Export_dealloc,
    .tp_doc = "Export(context, func, n_params, n_results, time_limit_seconds, owner): a guest export.",
};

/* -- Context: construction, the call, and what it recorded ------------------------------- */

static PyObject *Context_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    unsigned long long context, memory;
    PyObject *config, *call_log;
    long messages;
    long long bytes;
    unsigned long imports;
    PyObject *memory_owner;
    if (!PyArg_ParseTuple(args, "KKOSOlLk", &context, &memory, &memory_owner, &config, &call_log, &messages, &bytes,
                          &imports))
        return NULL;
    if (!context || !memory) {
        PyErr_SetString(PyExc_ValueError, "null wasmtime pointer");
        return NULL;
    }
    Context *self = (Context *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->context = (wasmtime_context_t *)(uintptr_t)context;
    self->memory = (wasmtime_memory_t *)(uintptr_t)memory;
    Py_INCREF(memory_owner);
    self->memory_owner = memory_owner;
    Py_INCREF(config);
    self->config = config;
    Py_INCREF(call_log);
    self->call_log = call_log;
    self->log_messages_limit = messages;
    self->log_bytes_limit = bytes;
    self->imports = imports;
    return (PyObject *)self;
}

static void clear_lines(Context *c) {
    for (size_t i = 0; i < c->n_lines; i++) free(c->lines[i].data);
    c->n_lines = 0;
}

static void clear_headers(Context *c) {
    for (size_t i = 0; i < c->n_headers; i++) {
        free(c->headers[i].name);
        free(c->headers[i].value);
    }
    c->n_headers = 0;
    c->headers_size = 0;
    c->headers_changed = 0;
}

static void end_snapshot(Context *c) {
    Py_CLEAR(c->method);
    Py_CLEAR(c->uri);
    Py_CLEAR(c->request_headers);
    c->has_request_headers = 0;
    c->n_request_headers = 0;
    c->state = NULL;
}

/* Whether the call changed its log counts since they were last taken or applied. */
static int counts_changed(Context *c) {
    return c->messages != c->messages_at_start || c->bytes != c->bytes_at_start || c->dropped != c->dropped_at_start ||
           c->dropped_bytes != c->dropped_bytes_at_start;
}

static void counts_taken(Context *c) {
    c->messages_at_start = c->messages;
    c->bytes_at_start = c->bytes;
    c->dropped_at_start = c->dropped;
    c->dropped_bytes_at_start = c->dropped_bytes;
}

static void Context_dealloc(Context *self) {
    end_snapshot(self);
    clear_lines(self);
    clear_headers(self);
    free(self->lines);
    free(self->headers);
    free(self->request_header_views);
    Py_XDECREF(self->memory_owner);
    Py_XDECREF(self->config);
    Py_XDECREF(self->call_log);
    Py_XDECREF(self->request_export);
    Py_XDECREF(self->response_export);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int get_long(PyObject *object, PyObject *name, long *out) {
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL) return -1;
    *out = PyLong_AsLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int get_long_long(PyObject *object, PyObject *name, long long *out) {
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL) return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The request headers as pointers into the (name, value) pairs of `headers`, which is kept. */
static int snapshot_request_headers(Context *c, PyObject *state) {
    PyObject *entries = NULL;
    PyObject *held = PyObject_GetAttr(state, s_request_headers);
    if (held == NULL) return -1;
    if (held == Py_None) {
        Py_DECREF(held);
        PyObject *read = PyObject_CallMethodNoArgs(state, s_read_request_headers);
        if (read == NULL) return -1;
        entries = PySequence_Fast(read, "request headers");
        Py_DECREF(read);
    } else {
        PyObject *list = PyObject_GetAttr(held, s_entries);
        Py_DECREF(held);
        if (list == NULL) return -1;
        entries = PySequence_Fast(list, "request headers");
        Py_DECREF(list);
    }
    if (entries == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(entries);
    if (n > c->request_header_capacity) {
        header_view *grown = realloc(c->request_header_views, (size_t)n * sizeof(header_view));
        if (grown == NULL) {
            Py_DECREF(entries);
            PyErr_NoMemory();
            return -1;
        }
        c->request_header_views = grown;
        c->request_header_capacity = n;
    }
    PyObject **items = PySequence_Fast_ITEMS(entries);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            Py_DECREF(entries);
            return 0; /* not plain pairs of bytes: Python answers */
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        c->request_header_views[i] =
            (header_view){PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)};
    }
    c->request_headers = entries;
    c->n_request_headers = n;
    c->has_request_headers = 1;
    return 0;
}

#define BIT(id) (1UL << (id))
#define NEEDS_PHASE (BIT(H_ENABLE_FEATURES) | BIT(H_SET_HEADER_VALUE) | BIT(H_ADD_HEADER_VALUE) | BIT(H_GET_HEADER_VALUES))
#define NEEDS_RESPONSE (BIT(H_SET_HEADER_VALUE) | BIT(H_ADD_HEADER_VALUE) | BIT(H_GET_HEADER_VALUES))
#define NEEDS_LOG (BIT(H_LOG) | BIT(H_LOG_ENABLED))

/* The snapshot of what the guest's imports may read: nothing for a guest that imports none of it. */
static int begin(Context *c, PyObject *instance, PyObject *state) {
    unsigned long imports = c->imports;
    c->instance = instance;
    c->state = state;
    c->python_mode = 0;
    c->pending = 0;
    c->request_phase = 0;
    c->response_owned = 0;
    c->log_level = LOG_NONE;
    if (imports & NEEDS_PHASE) {
        PyObject *phase = PyObject_GetAttr(state, s_phase);
        if (phase == NULL) return -1;
        c->request_phase = phase == request_phase;
        Py_DECREF(phase);
    }
    if (imports & BIT(H_ENABLE_FEATURES)) {
        if (get_long(state, s_features, &c->features) < 0) return -1;
    } else {
        c->features = 0;
    }
    c->features_at_start = c->features;
    if ((imports & BIT(H_GET_STATUS_CODE)) && get_long(state, s_status, &c->status) < 0) return -1;
    if (imports & BIT(H_GET_METHOD)) {
        c->method = PyObject_GetAttr(state, s_method);
        if (c->method == NULL) return -1;
        if (!PyBytes_Check(c->method)) c->python_mode = 1; /* not bytes: Python answers everything */
    }
    if (imports & BIT(H_GET_URI)) {
        c->uri = PyObject_GetAttr(state, s_uri);
        if (c->uri == NULL) return -1;
        if (!PyBytes_Check(c->uri)) c->python_mode = 1;
    }
    if (imports & NEEDS_RESPONSE) {
        PyObject *limit = PyObject_GetAttr(state, s_max_buffer_bytes);
        if (limit == NULL) return -1;
        c->max_buffer_bytes = limit == Py_None ? -1 : PyLong_AsLongLong(limit);
        Py_DECREF(limit);
        if (c->max_buffer_bytes == -1 && PyErr_Occurred()) return -1;
        PyObject *response = PyObject_GetAttr(state, s_response_headers);
        if (response == NULL) return -1;
        c->response_owned = c->request_phase && response == Py_None;
        Py_DECREF(response);
    }
    if (imports & NEEDS_LOG) {
        PyObject *log = c->call_log;
        if (get_long(instance, s_log_level, &c->log_level) < 0 || get_long(log, s_messages, &c->messages) < 0 ||
            get_long_long(log, s_bytes, &c->bytes) < 0 || get_long(log, s_dropped, &c->dropped) < 0 ||
            get_long_long(log, s_dropped_bytes, &c->dropped_bytes) < 0)
            return -1;
    } else {
        c->messages = 0;
        c->bytes = c->dropped = c->dropped_bytes = 0;
    }
    counts_taken(c);
    c->by_name = 0;
    if (imports & BIT(H_GET_HEADER_VALUES)) {
        /* A request whose calls run inline (state.inline: on the thread that holds the GIL) has its request
         * headers read when the guest asks, by name; any other call may run where the GIL is not held (a
         * lane worker), so it gets a copy of them all now, and never needs Python to read one. */
        PyObject *is_inline = PyObject_GetAttr(state, s_inline);
        if (is_inline == NULL) return -1;
        c->by_name = is_inline == Py_True;
        Py_DECREF(is_inline);
        if (!c->by_name && snapshot_request_headers(c, state) < 0) return -1;
    }
    return 0;
}

static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static PyObject *raise_from_hook(PyObject *hook, void *address) {
    PyObject *number = PyLong_FromVoidPtr(address);
    if (number == NULL) return NULL;
    PyObject *error = PyObject_CallOneArg(hook, number);
    Py_DECREF(number);
    if (error == NULL) return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(error), error);
    Py_DECREF(error);
    return NULL;
}

/*
 * The time limit, and the GIL in thread mode.  Every epoch tick past a call's deadline (armed one
 * tick ahead at the start of each call) runs on_deadline on the thread running the guest: past the
 * call's limit it ends the call (Python raises the pure path's time-limit error); before, it lets
 * the call go on for another tick.  A call in thread mode starts holding the GIL (mode 2) and
 * releases it here, at its first tick: a short call, most of them, never gives the GIL up and
 * never waits to take it back from the reactor; a long one holds it for one tick at most.
 */
static wasmtime_error_t *on_deadline(wasmtime_context_t *context, void *data, uint64_t *delta,
                                     wasmtime_update_deadline_kind_t *kind) {
    Context *c = current_call;
    if (c == NULL) return w_error_new("epoch deadline outside an accelerated call");
    if (monotonic() - c->call_started >= c->call_limit) {
        c->timed_out = 1;
        return w_error_new("guest exceeded its time limit");
    }
    if (c->may_release_gil && c->released == NULL) c->released = PyEval_SaveThread();
    *delta = 1;
    *kind = WASMTIME_UPDATE_DEADLINE_CONTINUE;
    return NULL;
}

/* call(export, gil_mode, instance, state, *args) -> the first result slot as an int.
 * gil_mode 0: release the GIL for the whole call; 1: keep it (inline); 2: keep it until the call's
 * first epoch tick (thread mode).  1 and 2 only while the epoch clock ticks without the GIL. */
static PyObject *call_export(Context *c, Export *export, long mode, PyObject *instance, PyObject *state);
static PyTypeObject ContextType;

static PyObject *Context_call(Context *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 4 || !PyObject_TypeCheck(args[0], &ExportType)) {
        PyErr_SetString(PyExc_TypeError, "call(export, gil_mode, instance, state, *args)");
        return NULL;
    }
    Export *export = (Export *)args[0];
    long mode = PyLong_AsLong(args[1]);
    if (mode == -1 && PyErr_Occurred()) return NULL;
    if (nargs - 4 != export->n_params) {
        PyErr_SetString(PyExc_TypeError, "wrong number of guest arguments");
        return NULL;
    }
    if (current_call != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "guest calls do not nest");
        return NULL;
    }
    for (Py_ssize_t i = 4; i < nargs; i++) {
        long long value = PyLong_AsLongLong(args[i]);
        if (value == -1 && PyErr_Occurred()) return NULL;
        export->slots[i - 4].i64 = value;
    }
    return call_export(c, export, mode, args[2], args[3]);
}

/*
 * A call in three parts, so that thread mode's lane (below) can run the middle one on a worker
 * without the GIL: call_enter takes the snapshot (GIL held), call_run calls the guest (the GIL as
 * `mode` says), call_leave ends the snapshot and turns a failure into the pure path's exception
 * (GIL held).  call_export is the three in a row.
 */
static int call_enter(Context *c, PyObject *instance, PyObject *state) {
    if (begin(c, instance, state) < 0) {
        end_snapshot(c);
        return -1;
    }
    return 0;
}

/* mode 0: release the GIL for the call; 1: keep it; 2: keep it until the first epoch tick; 3: the
 * caller holds no GIL (a lane worker), and the call does not take it unless Python must answer. */
static wasmtime_error_t *call_run(Context *c, Export *export, long mode, wasm_trap_t **trap) {
    c->call_started = monotonic();
    c->call_limit = export->limit;
    c->may_release_gil = mode == 2;
    c->timed_out = 0;
    c->released = NULL;
    w_set_epoch_deadline(export->context, 1); /* a C call: cheap enough to arm every call */
    wasmtime_error_t *error;
    *trap = NULL;
    current_call = c;
    if (mode == 0) {
        Py_BEGIN_ALLOW_THREADS
        error = w_func_call_unchecked(export->context, export->func, export->slots, export->count, trap);
        Py_END_ALLOW_THREADS
    } else {
        error = w_func_call_unchecked(export->context, export->func, export->slots, export->count, trap);
        if (c->released != NULL) {
            PyEval_RestoreThread(c->released);
            c->released = NULL;
        }
    }
    current_call = NULL;
    return error;
}

static PyObject *call_leave(Context *c, Export *export, wasmtime_error_t *error, wasm_trap_t *trap) {
    end_snapshot(c);
    c->instance = NULL;
    if (error != NULL && c->timed_out) {
        w_error_delete(error);
        PyObject *timeout = PyObject_CallNoArgs(timeout_hook);
        if (timeout == NULL) return NULL;
        PyErr_SetObject((PyObject *)Py_TYPE(timeout), timeout);
        Py_DECREF(timeout);
        return NULL;
    }
    if (error != NULL) return raise_from_hook(error_hook, error);
    if (trap != NULL) return raise_from_hook(trap_hook, trap);
    return PyLong_FromLongLong(export->slots[0].i64);
}

/* The call itself, its arguments already in the export's slots. */
static PyObject *call_export(Context *c, Export *export, long mode, PyObject *instance, PyObject *state) {
    if (call_enter(c, instance, state) < 0) return NULL;
    wasm_trap_t *trap;
    wasmtime_error_t *error = call_run(c, export, mode, &trap);
    return call_leave(c, export, error, trap);
}

/*
 * The fast call: what GuestInstance._call does around an accelerated call, done here for the common
 * case (the serving clock runs, no observer, no captured output; prepare_fast() was called), so that
 * a guest call makes no Python call at all unless the guest did something Python must see.  The
 * thread's target (native.current.target) is set only if Python runs during the call (a host function
 * C does not answer, or applying what C recorded); afterwards instance._end_fast_call(state, error)
 * does what _call's except and finally blocks do, whenever there is anything for them to do: an
 * error, something recorded, or Python having run.  Otherwise the call ends with instance.state = None.
 * Any other case goes to the pure path's method (instance.request_call / instance.handle_response).
 */
/* Whether the fast call serves `guest`'s calls now (1): the serving clock runs and nothing observes the
 * guest; 0 if not, -1 on an error. */
static int serves_fast(PyObject *guest) {
    PyObject *serving = PyDict_GetItemWithError(engine_globals, s_serving);
    if (serving != Py_True) return serving == NULL && PyErr_Occurred() ? -1 : 0;
    PyObject *observer = PyObject_GetAttr(guest, s_observer);
    if (observer == NULL) return -1;
    Py_DECREF(observer);
    return observer == no_observer;
}

static Context *fast_context(PyObject *instance, int *ok) {
    *ok = 1;
    PyObject *accel = PyObject_GetAttr(instance, s_accel);
    if (accel == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) PyErr_Clear(); /* not a GuestInstance: its own method */
        else *ok = 0;
        return NULL;
    }
    Py_DECREF(accel); /* the instance keeps it */
    if (!PyObject_TypeCheck(accel, &ContextType) || ((Context *)accel)->request_export == NULL) return NULL;
    if (current_call != NULL) return NULL; /* the pure path's method says why */
    PyObject *guest = PyObject_GetAttr(instance, s_guest);
    if (guest == NULL) {
        *ok = 0;
        return NULL;
    }
    int serves = serves_fast(guest);
    Py_DECREF(guest);
    if (serves < 0) *ok = 0;
    return serves > 0 ? (Context *)accel : NULL;
}

/* The pending exception, normalised and with its traceback, as the value an except block would see
 * (a new reference; NULL if there was none). */
static PyObject *fetch_error(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL) PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

/* callable(arg), or callable() if arg is NULL, run as in an except block handling `error`. */
static PyObject *call_while_handling(PyObject *error, PyObject *callable, PyObject *arg) {
    PyObject *saved_type, *saved_value, *saved_traceback;
    PyErr_GetExcInfo(&saved_type, &saved_value, &saved_traceback);
    PyObject *error_type = (PyObject *)Py_TYPE(error);
    Py_INCREF(error_type);
    Py_INCREF(error);
    PyErr_SetExcInfo(error_type, error, PyException_GetTraceback(error)); /* steals the three */
    PyObject *result = arg != NULL ? PyObject_CallOneArg(callable, arg) : PyObject_CallNoArgs(callable);
    PyErr_SetExcInfo(saved_type, saved_value, saved_traceback);
    return result;
}

/* The fast call's parts around call_enter/call_run/call_leave (see the lane, which splits them). */
static int fast_enter(Context *c, PyObject *instance, PyObject *state) {
    if (PyObject_SetAttr(instance, s_state, state) < 0) return -1;
    c->fast_call = 1;
    c->target_set = 0;
    return 0;
}

/* `result`: the call's (NULL with the error set if it failed); returns it, or NULL with the call's error. */
static PyObject *fast_leave(Context *c, PyObject *instance, PyObject *state, PyObject *result) {
    c->fast_call = 0;
    if (result != NULL && !c->pending && !c->target_set) {
        if (PyObject_SetAttr(instance, s_state, Py_None) < 0) Py_CLEAR(result);
        return result;
    }
    PyObject *error = Py_None;
    if (result == NULL) {
        error = fetch_error();
        if (error == NULL) return NULL;
    } else {
        Py_INCREF(error);
    }
    PyObject *ended = PyObject_CallMethodObjArgs(instance, s_end_fast_call, state, error, NULL);
    Py_DECREF(error);
    if (ended == NULL) {
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(ended);
    if (result == NULL) PyErr_SetString(PyExc_RuntimeError, "_end_fast_call did not raise the call's error");
    return result;
}

static PyObject *fast_call(Context *c, Export *export, int inline_call, PyObject *instance, PyObject *state) {
    PyObject *may_hold = PyDict_GetItemWithError(engine_globals, s_calls_may_hold_gil);
    if (may_hold == NULL && PyErr_Occurred()) return NULL;
    long mode = may_hold == Py_True ? (inline_call ? 1 : 2) : 0;
    if (fast_enter(c, instance, state) < 0) return NULL;
    return fast_leave(c, instance, state, call_export(c, export, mode, instance, state));
}

/* What call_request does before the call: 1 and *out set if the fast call takes it, 0 if the pure
 * path's method must, -1 on an error. */
static int request_enter(PyObject *instance, PyObject *state, Context **out) {
    int ok;
    Context *c = fast_context(instance, &ok);
    if (!ok) return -1;
    if (c == NULL) return 0;
    /* state.features |= instance.features; state.phase = REQUEST_PHASE */
    PyObject *features = PyObject_GetAttr(instance, s_features);
    if (features == NULL) return -1;
    int has_features = PyObject_IsTrue(features);
    if (has_features < 0) {
        Py_DECREF(features);
        return -1;
    }
    if (has_features) {
        PyObject *before = PyObject_GetAttr(state, s_features);
        PyObject *after = before ? PyNumber_Or(before, features) : NULL;
        Py_XDECREF(before);
        int failed = after == NULL || PyObject_SetAttr(state, s_features, after) < 0;
        Py_XDECREF(after);
        if (failed) {
            Py_DECREF(features);
            return -1;
        }
    }
    Py_DECREF(features);
    if (PyObject_SetAttr(state, s_phase, request_phase) < 0) return -1;
    *out = c;
    return 1;
}

/* call_request(instance, state, inline) -> handle_request's i64, as GuestInstance.request_call. */
static PyObject *call_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "call_request(instance, state, inline)");
        return NULL;
    }
    PyObject *instance = args[0], *state = args[1];
    Context *c;
    int fast = request_enter(instance, state, &c);
    if (fast < 0) return NULL;
    if (!fast) return PyObject_CallMethodObjArgs(instance, s_request_call, state, args[2], NULL);
    int inline_call = PyObject_IsTrue(args[2]);
    if (inline_call < 0) return NULL;
    return fast_call(c, (Export *)c->request_export, inline_call, instance, state);
}

/* What call_response does before the call (as request_enter): the export's arguments in its slots. */
static int response_enter(PyObject *instance, PyObject *req_ctx, PyObject *is_error_object, Context **out) {
    int ok;
    Context *c = fast_context(instance, &ok);
    if (!ok) return -1;
    if (c == NULL) return 0;
    unsigned long long ctx = PyLong_AsUnsignedLongLongMask(req_ctx);
    if (ctx == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    int is_error = PyObject_IsTrue(is_error_object);
    if (is_error < 0) return -1;
    Export *export = (Export *)c->response_export;
    export->slots[0].i64 = (int64_t)(int32_t)(uint32_t)ctx; /* as the pure path: the low 32 bits, signed */
    export->slots[1].i64 = is_error;
    *out = c;
    return 1;
}

/* call_response(instance, state, req_ctx, is_error, inline): handle_response, as GuestInstance.handle_response. */
static PyObject *call_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "call_response(instance, state, req_ctx, is_error, inline)");
        return NULL;
    }
    PyObject *instance = args[0], *state = args[1];
    Context *c;
    int fast = response_enter(instance, args[2], args[3], &c);
    if (fast < 0) return NULL;
    if (!fast)
        return PyObject_CallMethodObjArgs(instance, s_handle_response, state, args[2], args[3], args[4], NULL);
    int inline_call = PyObject_IsTrue(args[4]);
    if (inline_call < 0) return NULL;
    PyObject *result = fast_call(c, (Export *)c->response_export, inline_call, instance, state);
    if (result == NULL) return NULL;
    Py_DECREF(result);
    Py_RETURN_NONE;
}

/* Context.prepare_fast(request_export, response_export): call_request/call_response may take this instance. */
static PyObject *Context_prepare_fast(Context *c, PyObject *args) {
    PyObject *request, *response;
    if (!PyArg_ParseTuple(args, "O!O!", &ExportType, &request, &ExportType, &response)) return NULL;
    if (((Export *)request)->n_params != 0 || ((Export *)response)->n_params != 2) {
        PyErr_SetString(PyExc_ValueError, "handle_request takes no arguments, handle_response two");
        return NULL;
    }
    if (current_local == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup_calls() first");
        return NULL;
    }
    Py_INCREF(request);
    Py_XSETREF(c->request_export, request);
    Py_INCREF(response);
    Py_XSETREF(c->response_export, response);
    Py_RETURN_NONE;
}

/* setup_calls(current, engine_globals, no_observer): what the fast call reads. */
static PyObject *setup_calls(PyObject *module, PyObject *args) {
    PyObject *current, *globals, *nothing;
    if (!PyArg_ParseTuple(args, "OO!O", &current, &PyDict_Type, &globals, &nothing)) return NULL;
    Py_INCREF(current);
    Py_XSETREF(current_local, current);
    Py_INCREF(globals);
    Py_XSETREF(engine_globals, globals);
    Py_INCREF(nothing);
    Py_XSETREF(no_observer, nothing);
    Py_RETURN_NONE;
}

/* -- the session: one request's pinned instance (runtime/session.py's GuestSession, in C) ---------- */

typedef struct {
    PyObject_HEAD
    PyObject *pool;
    PyObject *instance; /* pinned from handle_request to handle_response, or NULL */
    PyObject *state;
    PyObject *req_ctx;
    PyObject *guest; /* or NULL: the lane asks serves_fast(guest) before pinning an instance */
    int inline_call;
} Session;

static PyObject *s_acquire, *s_release, *s_check_size, *s_body_length, *s_is_error;

static PyObject *Session_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"pool", "state", "inline", "guest", NULL};
    PyObject *pool, *state, *guest = NULL;
    int inline_call = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|pO", names, &pool, &state, &inline_call, &guest)) return NULL;
    Session *self = (Session *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    Py_INCREF(pool);
    self->pool = pool;
    Py_INCREF(state);
    self->state = state;
    self->req_ctx = PyLong_FromLong(0);
    self->inline_call = inline_call;
    Py_XINCREF(guest);
    self->guest = guest;
    if (self->req_ctx == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Session_traverse(Session *self, visitproc visit, void *arg) {
    Py_VISIT(self->pool);
    Py_VISIT(self->instance);
    Py_VISIT(self->state);
    Py_VISIT(self->guest);
    return 0;
}

static int Session_clear(Session *self) {
    Py_CLEAR(self->pool);
    Py_CLEAR(self->instance);
    Py_CLEAR(self->state);
    Py_CLEAR(self->req_ctx);
    Py_CLEAR(self->guest);
    return 0;
}

static void Session_dealloc(Session *self) {
    PyObject_GC_UnTrack(self);
    Session_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Session_close(Session *self, PyObject *unused) {
    PyObject *instance = self->instance;
    self->instance = NULL;
    if (instance == NULL) Py_RETURN_NONE;
    PyObject *released = PyObject_CallMethodOneArg(self->pool, s_release, instance);
    Py_DECREF(instance);
    return released;
}

/* On an error: give the instance back (as `except BaseException: self.close(); raise`), keep the error. */
static PyObject *close_and_fail(Session *self) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *closed = Session_close(self, NULL);
    if (closed == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return NULL;
    }
    Py_DECREF(closed);
    PyErr_Restore(type, value, traceback);
    return NULL;
}

static PyObject *call_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
static PyObject *call_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* What handle_request checks once the instance is pinned, before the guest is called. */
static int session_check(Session *self, PyObject *instance) {
    PyObject *features = PyObject_GetAttr(instance, s_features);
    if (features == NULL) return -1;
    long bits = PyLong_AsLong(features);
    Py_DECREF(features);
    if (bits == -1 && PyErr_Occurred()) return -1;
    if (bits & 1) { /* buffer_request: a body over the limit is refused before the guest is called */
        PyObject *length = PyObject_GetAttr(self->state, s_body_length);
        if (length == NULL) return -1;
        PyObject *checked = PyObject_CallMethodOneArg(self->state, s_check_size, length);
        Py_DECREF(length);
        if (checked == NULL) return -1;
        Py_DECREF(checked);
    }
    return 0;
}

/* handle_request's end, from the call's result (NULL: it failed): True if the guest passed the request on. */
static PyObject *session_request_done(Session *self, PyObject *result) {
    if (result == NULL) return close_and_fail(self);
    unsigned long long value = PyLong_AsUnsignedLongLongMask(result);
    Py_DECREF(result);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) return close_and_fail(self);
    /* As abi.unpack_ctx_next: the low 32 bits are next, the high req_ctx. */
    PyObject *ctx = PyLong_FromUnsignedLongLong(value >> 32);
    if (ctx == NULL) return close_and_fail(self);
    Py_XSETREF(self->req_ctx, ctx);
    if ((value & 0xFFFFFFFFULL) != 1) {
        PyObject *closed = Session_close(self, NULL);
        if (closed == NULL) return NULL;
        Py_DECREF(closed);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* handle_response's end: unpin. */
static PyObject *session_response_done(Session *self, PyObject *result) {
    if (result == NULL) return close_and_fail(self);
    Py_DECREF(result);
    return Session_close(self, NULL);
}

static PyObject *Session_handle_request(Session *self, PyObject *unused) {
    PyObject *instance = PyObject_CallMethodNoArgs(self->pool, s_acquire);
    if (instance == NULL) return NULL;
    Py_XSETREF(self->instance, instance);
    if (session_check(self, instance) < 0) return close_and_fail(self);
    PyObject *call_args[3] = {instance, self->state, self->inline_call ? Py_True : Py_False};
    Py_INCREF(instance); /* pinned: close() may drop the session's reference meanwhile */
    PyObject *result = call_request(NULL, call_args, 3);
    Py_DECREF(instance);
    return session_request_done(self, result);
}

static PyObject *Session_handle_response(Session *self, PyObject *unused) {
    PyObject *instance = self->instance;
    if (instance == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "handle_response without a pinned instance (handle_request did not pass it on)");
        return NULL;
    }
    PyObject *is_error = PyObject_GetAttr(self->state, s_is_error);
    if (is_error == NULL) return close_and_fail(self);
    Py_INCREF(instance);
    PyObject *call_args[5] = {instance, self->state, self->req_ctx, is_error,
                              self->inline_call ? Py_True : Py_False};
    PyObject *result = call_response(NULL, call_args, 5);
    Py_DECREF(instance);
    Py_DECREF(is_error);
    return session_response_done(self, result);
}

static PyObject *Session_get_inline(Session *self, void *unused) { return PyBool_FromLong(self->inline_call); }

static PyMethodDef Session_methods[] = {
    {"handle_request", (PyCFunction)Session_handle_request, METH_NOARGS,
     "Pin an instance and run handle_request; True if the guest passes the request on (next)."},
    {"handle_response", (PyCFunction)Session_handle_response, METH_NOARGS,
     "Run handle_response (state.is_error says how the next handler ended) and unpin."},
    {"close", (PyCFunction)Session_close, METH_NOARGS,
     "Give the pinned instance back to the pool (a trapped one is discarded); again: nothing."},
    {NULL}};

static PyMemberDef Session_members[] = {
    {"state", T_OBJECT_EX, offsetof(Session, state), READONLY, "The request's state."},
    {"req_ctx", T_OBJECT_EX, offsetof(Session, req_ctx), READONLY, "What handle_request returned for handle_response."},
    {NULL}};

static PyGetSetDef Session_getset[] = {
    {"inline", (getter)Session_get_inline, NULL, "The calls are made on the reactor thread.", NULL}, {NULL}};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.runtime._accel.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Session_new,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_traverse = (traverseproc)Session_traverse,
    .tp_clear = (inquiry)Session_clear,
    .tp_methods = Session_methods,
    .tp_members = Session_members,
    .tp_getset = Session_getset,
    .tp_doc = "Session(pool, state, inline=False, guest=None): the guest calls of one request, on one pinned instance "
              "(runtime/session.py's GuestSession, for accelerated guests).",
};

/* -- thread mode's lane: guest calls on workers that do not wait for the GIL ---------------------
 *
 * web/guest_threads.py's GuestWorkers hands each guest call to a worker thread.  Through Python, a
 * worker takes the GIL to pick the call up and again to hand its result back, and under load the
 * reactor holds the GIL: each hand-off waits for it.  The lane is the same queue in C.  A session's
 * call (a C Session's handle_request or handle_response) is prepared on the reactor thread, which
 * holds the GIL anyway (pin an idle instance, take the snapshot: what the synchronous fast call does
 * before calling the guest), run on a worker that holds no GIL (call_run, mode 3: the GIL is taken
 * only if a host function needs Python), and finished on the reactor thread (call_leave and the
 * session's end, then the continuation).  Workers wake the reactor through an eventfd, once for every
 * batch of results.  Anything else put on the lane (a call the fast path does not take, the pool's
 * stop markers) is handed back to the worker's Python loop as it was given.
 */

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

enum { JOB_ITEM, JOB_FAST };

typedef struct lane_job {
    struct lane_job *next;
    int kind;
    PyObject *item;      /* JOB_ITEM: what put() was given */
    Session *session;    /* JOB_FAST: the request's session, its pinned instance and the call */
    PyObject *instance;
    Context *context;
    Export *export;
    int response;        /* 0: handle_request, 1: handle_response */
    PyObject *on_result, *on_error, *still_wanted;
    double queued_at;
    int dropped;         /* still_wanted said no: not run */
    wasmtime_error_t *error;
    wasm_trap_t *trap;
    PyObject *failed;    /* preparing the call failed: on_error gets this */
} lane_job;

typedef struct {
    PyObject_HEAD
    volatile double since; /* NAN while the thread waits for work */
    long long native_id;   /* -1: not known yet */
    volatile int demoted;
} Seat;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t ready;
    lane_job *head, *tail;
    Py_ssize_t queued;
    Py_ssize_t held;     /* queued by run() since the last flush(): no worker was woken for them yet */
    int waiting;         /* workers waiting for work */
    lane_job *done_head, *done_tail;
    int wake_pending;
    int fd;
    long dropped;
    double ask_after;
    PyObject *on_failure;
    PyObject *on_due; /* or NULL: called (on the reactor thread) when run() makes a flush() due */
} Lane;

static PyObject *s_acquire_idle;

static void free_job(lane_job *job) {
    Py_XDECREF(job->item);
    Py_XDECREF(job->session);
    Py_XDECREF(job->instance);
    Py_XDECREF(job->context);
    Py_XDECREF(job->export);
    Py_XDECREF(job->on_result);
    Py_XDECREF(job->on_error);
    Py_XDECREF(job->still_wanted);
    Py_XDECREF(job->failed);
    free(job);
}

static void wake_reactor(Lane *lane) { /* with the lock held */
    if (lane->wake_pending || lane->fd < 0) return;
    lane->wake_pending = 1;
    uint64_t one = 1;
    ssize_t written = write(lane->fd, &one, sizeof one);
    (void)written; /* EAGAIN: the counter is full, so a wake-up is pending anyway */
}

/* Queue a job; `hold`: wake no worker for it until flush() (returns whether flush() is due: the first held job). */
static int push_job(Lane *lane, lane_job *job, int hold) {
    int due = 0;
    pthread_mutex_lock(&lane->lock);
    job->next = NULL;
    if (lane->tail) lane->tail->next = job;
    else lane->head = job;
    lane->tail = job;
    lane->queued++;
    if (hold) due = lane->held++ == 0;
    else if (lane->waiting) pthread_cond_signal(&lane->ready);
    pthread_mutex_unlock(&lane->lock);
    return due;
}

static void push_done(Lane *lane, lane_job *job) { /* with the lock held */
    job->next = NULL;
    if (lane->done_tail) lane->done_tail->next = job;
    else lane->done_head = job;
    lane->done_tail = job;
    wake_reactor(lane);
}

/* Prepare a session's call on the reactor thread: 1 if the job holds a call ready to run, 0 if the
 * fast path does not take it (nothing changed: the pure path's item serves it), -1 if preparing
 * failed (job->failed is the error, as the call would have raised it). */
static int lane_prepare(lane_job *job, Session *session, int response) {
    PyObject *state = session->state, *instance;
    Context *c;
    Export *export;
    int fast;
    if (!response) {
        /* Asked before an instance is pinned (request_enter asks again, of the instance's guest): the first
         * call in a process (it starts the serving clock) and an observed guest's go the Python way. */
        if (session->guest != NULL) {
            int serves = serves_fast(session->guest);
            if (serves < 0) goto failed;
            if (!serves) return 0;
        }
        /* An idle instance only: making one runs guest code, which thread mode keeps off the reactor. */
        instance = PyObject_CallMethodNoArgs(session->pool, s_acquire_idle);
        if (instance == NULL) goto failed;
        if (instance == Py_None) {
            Py_DECREF(instance);
            return 0;
        }
        Py_XSETREF(session->instance, instance);
        if (session_check(session, instance) < 0) goto close_failed;
        fast = request_enter(instance, state, &c);
        if (fast < 0) goto close_failed;
        if (!fast) { /* give it back: the worker's own call pins one */
            PyObject *closed = Session_close(session, NULL);
            if (closed == NULL) goto failed;
            Py_DECREF(closed);
            return 0;
        }
        export = (Export *)c->request_export;
    } else {
        instance = session->instance;
        if (instance == NULL) return 0; /* the session's method says why */
        PyObject *is_error = PyObject_GetAttr(state, s_is_error);
        if (is_error == NULL) goto close_failed;
        fast = response_enter(instance, session->req_ctx, is_error, &c);
        Py_DECREF(is_error);
        if (fast < 0) goto close_failed;
        if (!fast) return 0;
        export = (Export *)c->response_export;
    }
    if (fast_enter(c, instance, state) < 0) goto close_failed;
    if (call_enter(c, instance, state) < 0) {
        PyObject *result = fast_leave(c, instance, state, NULL);
        result = response ? session_response_done(session, result) : session_request_done(session, result);
        Py_XDECREF(result);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "a failed snapshot raised nothing");
        goto failed;
    }
    Py_INCREF(instance);
    job->instance = instance;
    Py_INCREF(c);
    job->context = c;
    Py_INCREF(export);
    job->export = export;
    job->response = response;
    return 1;
close_failed:
    Py_XDECREF(close_and_fail(session));
failed:
    job->failed = fetch_error();
    if (job->failed == NULL) /* never left without an error for on_error: deliver() must not take it for a call */
        job->failed = PyObject_CallFunction(PyExc_RuntimeError, "s", "preparing a guest call failed without an error");
    return -1; /* job->failed NULL: not even that could be made, and its error is set */
}

/* A dropped call is undone: as if it had never been prepared (its instance goes back to the pool). */
static void lane_undo(lane_job *job) {
    Context *c = job->context;
    c->fast_call = 0;
    end_snapshot(c);
    c->instance = NULL;
    if (PyObject_SetAttr(job->instance, s_state, Py_None) < 0) PyErr_WriteUnraisable(job->instance);
    PyObject *closed = Session_close(job->session, NULL);
    if (closed == NULL) PyErr_WriteUnraisable((PyObject *)job->session);
    Py_XDECREF(closed);
}

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    double ask_after;
    PyObject *on_failure;
    if (!PyArg_ParseTuple(args, "dO", &ask_after, &on_failure)) return NULL;
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->fd = -1;
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    int failed = pthread_mutex_init(&self->lock, NULL) || pthread_cond_init(&self->ready, &attributes);
    pthread_condattr_destroy(&attributes);
    if (failed) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_OSError, "cannot make the lane's lock");
        return NULL;
    }
    self->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (self->fd < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->ask_after = ask_after;
    Py_INCREF(on_failure);
    self->on_failure = on_failure;
    return (PyObject *)self;
}

static void Lane_dealloc(Lane *self) {
    /* No lock: nothing else can hold a reference now (and in a forked child, a parent's thread may have held it). */
    for (lane_job *job = self->head, *next; job != NULL; job = next) {
        next = job->next;
        free_job(job);
    }
    for (lane_job *job = self->done_head, *next; job != NULL; job = next) {
        next = job->next;
        free_job(job);
    }
    if (self->fd >= 0) close(self->fd);
    Py_XDECREF(self->on_failure);
    Py_XDECREF(self->on_due);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether `work` is a C session's handle_request or handle_response (a bound method of a Session). */
static int session_call_of(PyObject *work, Session **session, int *response) {
    if (!PyCFunction_Check(work)) return 0;
    PyObject *self = PyCFunction_GET_SELF(work);
    if (self == NULL || !PyObject_TypeCheck(self, &SessionType)) return 0;
    PyCFunction function = PyCFunction_GET_FUNCTION(work);
    if (function == (PyCFunction)Session_handle_request) *response = 0;
    else if (function == (PyCFunction)Session_handle_response) *response = 1;
    else return 0;
    *session = (Session *)self;
    return 1;
}

static lane_job *new_job(int kind) {
    lane_job *job = calloc(1, sizeof(lane_job));
    if (job == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    job->kind = kind;
    job->queued_at = monotonic();
    return job;
}

static PyObject *Lane_put(Lane *self, PyObject *item) {
    lane_job *job = new_job(JOB_ITEM);
    if (job == NULL) return NULL;
    Py_INCREF(item);
    job->item = item;
    push_job(self, job, 0);
    Py_RETURN_NONE;
}

/* flush(): wake workers for what run() queued since the last flush (one each, as many as wait). */
static PyObject *Lane_flush(Lane *self, PyObject *unused) {
    pthread_mutex_lock(&self->lock);
    Py_ssize_t wake = self->held < self->waiting ? self->held : self->waiting;
    self->held = 0;
    for (Py_ssize_t i = 0; i < wake; i++) pthread_cond_signal(&self->ready);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

/* run()'s answer: whether a flush() is due; on_due, if set, is called for it. */
static PyObject *due(Lane *self, int is_due) {
    if (is_due && self->on_due != NULL) {
        PyObject *called = PyObject_CallNoArgs(self->on_due);
        if (called == NULL) return NULL;
        Py_DECREF(called);
    }
    return PyBool_FromLong(is_due);
}

static PyObject *queue_item(Lane *self, PyObject *const *args, PyObject *still_wanted) {
    PyObject *item = PyTuple_Pack(4, args[0], args[1], args[2], still_wanted);
    if (item == NULL) return NULL;
    lane_job *job = new_job(JOB_ITEM);
    if (job == NULL) {
        Py_DECREF(item);
        return NULL;
    }
    job->item = item;
    return due(self, push_job(self, job, 1));
}

/* run(work, on_result, on_error, still_wanted=None): GuestWorkers.run's queueing.  No worker is woken
 * yet: the reactor thread calls flush() once its turn is over (True: this call made one due), so
 * that the calls of one reactor turn go to the workers in one hand-off. */
static PyObject *Lane_run(Lane *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *still_wanted = nargs == 4 ? args[3] : Py_None;
    if (nkw == 1 && nargs == 3 && PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) &&
        PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "still_wanted") == 0)
        still_wanted = args[3];
    else if (nkw != 0 || nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "run(work, on_result, on_error, still_wanted=None)");
        return NULL;
    }
    PyObject *work = args[0];
    Session *session;
    int response;
    if (session_call_of(work, &session, &response)) {
        lane_job *job = new_job(JOB_FAST);
        if (job == NULL) return NULL;
        int prepared = lane_prepare(job, session, response);
        if (prepared < 0 && job->failed == NULL) {
            free_job(job);
            return NULL;
        }
        if (prepared != 0) {
            Py_INCREF(session);
            job->session = session;
            Py_INCREF(args[1]);
            job->on_result = args[1];
            Py_INCREF(args[2]);
            job->on_error = args[2];
            if (still_wanted != Py_None) {
                Py_INCREF(still_wanted);
                job->still_wanted = still_wanted;
            }
            if (prepared > 0) return due(self, push_job(self, job, 1));
            /* the error is delivered as a call's would be: later, on the reactor */
            pthread_mutex_lock(&self->lock);
            push_done(self, job);
            pthread_mutex_unlock(&self->lock);
            Py_RETURN_FALSE;
        }
        free_job(job);
    }
    return queue_item(self, args, still_wanted);
}

static void clear_thread_target(void) {
    PyGILState_STATE gil = PyGILState_Ensure();
    if (PyObject_SetAttr(current_local, s_target, Py_None) < 0) PyErr_WriteUnraisable(current_local);
    PyGILState_Release(gil);
}

static PyTypeObject SeatType;

/* get(seat, timeout): run sessions' calls until something else arrives (returned as it was put),
 * `timeout` seconds pass with nothing to do (None), or the seat is demoted after a call (False). */
static PyObject *Lane_get(Lane *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"seat", "timeout", NULL};
    Seat *seat;
    double timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!d", names, &SeatType, &seat, &timeout)) return NULL;
    PyObject *outcome = NULL;
    PyThreadState *saved = PyEval_SaveThread();
    double deadline = monotonic() + timeout;
    pthread_mutex_lock(&self->lock);
    for (;;) {
        while (self->head == NULL) {
            double whole;
            double fraction = modf(deadline, &whole);
            struct timespec until = {(time_t)whole, (long)(fraction * 1e9)};
            self->waiting++;
            int waited = pthread_cond_timedwait(&self->ready, &self->lock, &until);
            self->waiting--;
            if (waited == ETIMEDOUT && self->head == NULL) {
                pthread_mutex_unlock(&self->lock);
                PyEval_RestoreThread(saved);
                Py_RETURN_NONE;
            }
        }
        lane_job *job = self->head;
        self->head = job->next;
        if (self->head == NULL) self->tail = NULL;
        self->queued--;
        pthread_mutex_unlock(&self->lock);
        if (job->kind == JOB_ITEM) {
            PyEval_RestoreThread(saved);
            outcome = job->item;
            job->item = NULL;
            free_job(job);
            return outcome;
        }
        /* Asked only of a call that waited (a client can have left only if time passed); see GuestWorkers.run. */
        if (job->still_wanted != NULL && monotonic() - job->queued_at >= self->ask_after) {
            PyEval_RestoreThread(saved);
            PyObject *wanted = PyObject_CallNoArgs(job->still_wanted);
            int yes = wanted == NULL ? -1 : PyObject_IsTrue(wanted);
            Py_XDECREF(wanted);
            if (yes < 0) {
                PyErr_WriteUnraisable(job->still_wanted);
                yes = 1;
            }
            saved = PyEval_SaveThread();
            job->dropped = !yes;
        }
        if (!job->dropped) {
            seat->since = monotonic();
            job->error = call_run(job->context, job->export, 3, &job->trap);
            if (job->context->target_set) clear_thread_target(); /* Python ran here; its reference goes */
            seat->since = NAN;
        }
        pthread_mutex_lock(&self->lock);
        if (job->dropped) self->dropped++;
        push_done(self, job);
        if (seat->demoted) {
            pthread_mutex_unlock(&self->lock);
            PyEval_RestoreThread(saved);
            Py_RETURN_FALSE;
        }
        deadline = monotonic() + timeout;
    }
}

/* deliver(): on the reactor thread (the lane's file descriptor is readable): finish every call that
 * ran and run its continuation.  A continuation's exception goes to on_failure, called as in an
 * except block, and the others still run. */
static PyObject *Lane_deliver(Lane *self, PyObject *unused) {
    uint64_t count;
    pthread_mutex_lock(&self->lock);
    if (self->fd >= 0) {
        ssize_t got = read(self->fd, &count, sizeof count);
        (void)got; /* EAGAIN: nothing was signalled, and what is done is taken anyway */
    }
    lane_job *jobs = self->done_head;
    self->done_head = self->done_tail = NULL;
    self->wake_pending = 0;
    pthread_mutex_unlock(&self->lock);
    while (jobs != NULL) {
        lane_job *job = jobs;
        jobs = job->next;
        PyObject *callback, *value;
        if (job->failed != NULL) {
            callback = job->on_error;
            value = job->failed;
            job->failed = NULL;
        } else if (job->dropped) {
            lane_undo(job);
            free_job(job);
            continue;
        } else {
            Context *c = job->context;
            PyObject *state = job->session->state;
            PyObject *result = call_leave(c, job->export, job->error, job->trap);
            job->error = NULL;
            job->trap = NULL;
            result = fast_leave(c, job->instance, state, result);
            result = job->response ? session_response_done(job->session, result)
                                   : session_request_done(job->session, result);
            if (result != NULL) {
                callback = job->on_result;
                value = result;
            } else {
                callback = job->on_error;
                value = fetch_error();
                if (value == NULL) {
                    value = Py_None;
                    Py_INCREF(value);
                }
            }
        }
        PyObject *out = PyObject_CallOneArg(callback, value);
        Py_DECREF(value);
        free_job(job);
        if (out != NULL) {
            Py_DECREF(out);
            continue;
        }
        if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* as `except Exception`: the rest goes on up, later */
            if (jobs != NULL) {
                pthread_mutex_lock(&self->lock);
                lane_job *last = jobs;
                while (last->next != NULL) last = last->next;
                last->next = self->done_head;
                if (self->done_head == NULL) self->done_tail = last;
                self->done_head = jobs;
                self->wake_pending = 0;
                wake_reactor(self);
                pthread_mutex_unlock(&self->lock);
            }
            return NULL;
        }
        PyObject *error = fetch_error();
        if (error == NULL) continue;
        PyObject *reported = call_while_handling(error, self->on_failure, NULL);
        Py_DECREF(error);
        if (reported == NULL) PyErr_WriteUnraisable(self->on_failure);
        Py_XDECREF(reported);
    }
    Py_RETURN_NONE;
}

static PyObject *Lane_fileno(Lane *self, PyObject *unused) { return PyLong_FromLong(self->fd); }

/* close(): the eventfd goes (once no worker is left: results are no longer signalled). */
static PyObject *Lane_close(Lane *self, PyObject *unused) {
    pthread_mutex_lock(&self->lock);
    int fd = self->fd;
    self->fd = -1;
    pthread_mutex_unlock(&self->lock);
    if (fd >= 0) close(fd);
    Py_RETURN_NONE;
}

static PyObject *Lane_qsize(Lane *self, PyObject *unused) {
    pthread_mutex_lock(&self->lock);
    Py_ssize_t queued = self->queued;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSsize_t(queued);
}

static PyObject *Lane_empty(Lane *self, PyObject *unused) {
    pthread_mutex_lock(&self->lock);
    int empty = self->head == NULL;
    pthread_mutex_unlock(&self->lock);
    return PyBool_FromLong(empty);
}

static PyObject *Lane_ready(Lane *self, PyObject *unused) {
    Py_ssize_t ready = 0;
    pthread_mutex_lock(&self->lock);
    for (lane_job *job = self->done_head; job != NULL; job = job->next) ready++;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSsize_t(ready);
}

static PyObject *Lane_get_dropped(Lane *self, void *unused) {
    pthread_mutex_lock(&self->lock);
    long dropped = self->dropped;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromLong(dropped);
}

static PyMethodDef Lane_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Lane_run, METH_FASTCALL | METH_KEYWORDS,
     "run(work, on_result, on_error, still_wanted=None): queue a call (a session's is prepared here)."},
    {"put", (PyCFunction)Lane_put, METH_O, "put(item): queue an item for a worker's Python loop (a worker wakes now)."},
    {"flush", (PyCFunction)Lane_flush, METH_NOARGS, "Wake workers for what run() queued since the last flush()."},
    {"get", (PyCFunction)(void (*)(void))Lane_get, METH_VARARGS | METH_KEYWORDS,
     "get(seat, timeout): run sessions' calls; the next other item, None after timeout idle, False if demoted."},
    {"deliver", (PyCFunction)Lane_deliver, METH_NOARGS, "Finish the calls that ran and run their continuations."},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "The eventfd that is readable while results wait."},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "Close the eventfd (the workers have ended)."},
    {"qsize", (PyCFunction)Lane_qsize, METH_NOARGS, "How many calls and items wait for a worker."},
    {"empty", (PyCFunction)Lane_empty, METH_NOARGS, "Whether nothing waits for a worker."},
    {"ready", (PyCFunction)Lane_ready, METH_NOARGS, "How many calls have run and wait for deliver()."},
    {NULL}};

static PyMemberDef Lane_members[] = {
    {"on_due", T_OBJECT, offsetof(Lane, on_due), 0, "Called when run() makes a flush() due (None: run() only says so)."},
    {NULL}};

static PyGetSetDef Lane_getset[] = {
    {"dropped", (getter)Lane_get_dropped, NULL, "Sessions' calls dropped unstarted (still_wanted said no).", NULL},
    {NULL}};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.runtime._accel.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Lane_new,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_members = Lane_members,
    .tp_getset = Lane_getset,
    .tp_doc = "Lane(ask_after, on_failure): thread mode's queue of guest calls (web/guest_threads.py).",
};

static PyObject *Seat_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (!PyArg_ParseTuple(args, ":Seat")) return NULL;
    Seat *self = (Seat *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->since = NAN;
    self->native_id = -1;
    return (PyObject *)self;
}

static PyObject *Seat_get_since(Seat *self, void *unused) {
    double since = self->since;
    if (isnan(since)) Py_RETURN_NONE;
    return PyFloat_FromDouble(since);
}

static int Seat_set_since(Seat *self, PyObject *value, void *unused) {
    if (value == NULL || value == Py_None) {
        self->since = NAN;
        return 0;
    }
    double since = PyFloat_AsDouble(value);
    if (since == -1.0 && PyErr_Occurred()) return -1;
    self->since = since;
    return 0;
}

static PyObject *Seat_get_native_id(Seat *self, void *unused) {
    if (self->native_id < 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(self->native_id);
}

static int Seat_set_native_id(Seat *self, PyObject *value, void *unused) {
    if (value == NULL || value == Py_None) {
        self->native_id = -1;
        return 0;
    }
    long long id = PyLong_AsLongLong(value);
    if (id == -1 && PyErr_Occurred()) return -1;
    self->native_id = id;
    return 0;
}

static PyObject *Seat_get_demoted(Seat *self, void *unused) { return PyBool_FromLong(self->demoted); }

static int Seat_set_demoted(Seat *self, PyObject *value, void *unused) {
    int demoted = value == NULL ? 0 : PyObject_IsTrue(value);
    if (demoted < 0) return -1;
    self->demoted = demoted;
    return 0;
}

static PyGetSetDef Seat_getset[] = {
    {"since", (getter)Seat_get_since, (setter)Seat_set_since, "When the current call began; None while waiting.",
     NULL},
    {"native_id", (getter)Seat_get_native_id, (setter)Seat_set_native_id, "The thread's native id.", NULL},
    {"demoted", (getter)Seat_get_demoted, (setter)Seat_set_demoted,
     "Runs at the lowest CPU priority; ends after its call.", NULL},
    {NULL}};

static PyTypeObject SeatType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.runtime._accel.Seat",
    .tp_basicsize = sizeof(Seat),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Seat_new,
    .tp_getset = Seat_getset,
    .tp_doc = "Seat(): one lane worker, as GuestWorkers' _Worker (since, native_id, demoted), readable without the GIL.",
};

/* -- the inline runner's run (web/runners.py), without a Python frame ------------------------- */

/* run_inline(work, on_result, on_error, still_wanted=None): as InlineRunner.run. */
static PyObject *run_inline(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "run_inline(work, on_result, on_error, still_wanted=None)");
        return NULL;
    }
    PyObject *result = PyObject_CallNoArgs(args[0]);
    if (result != NULL) {
        PyObject *done = PyObject_CallOneArg(args[1], result);
        Py_DECREF(result);
        return done;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL; /* as `except Exception`: the rest goes on up */
    PyObject *error = fetch_error();
    if (error == NULL) return NULL;
    /* on_error runs as in an except block: the error is the one being handled. */
    PyObject *handled = call_while_handling(error, args[2], error);
    Py_DECREF(error);
    return handled;
}

/* install_time_limit(store): end calls past their limit through on_deadline, from now on. */
static PyObject *install_time_limit(PyObject *module, PyObject *arg) {
    void *store = PyLong_AsVoidPtr(arg);
    if (store == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null store");
        return NULL;
    }
    w_store_epoch_deadline_callback((wasmtime_store_t *)store, on_deadline, NULL, NULL);
    Py_RETURN_NONE;
}

/* A recorded log line's text, as it is logged (undecodable bytes replaced, a cut line says by how much). */
static PyObject *line_text(log_line *line) {
    PyObject *text = PyUnicode_DecodeUTF8(line->data, (Py_ssize_t)line->len, "replace");
    if (text != NULL && line->more) {
        PyObject *longer = PyUnicode_FromFormat("%U... [%zu more bytes not logged]", text, line->more);
        Py_DECREF(text);
        text = longer;
    }
    return text;
}

/* take() -> (features | None, (messages, bytes, dropped, dropped_bytes) | None, [(level, text)], [(name, value)] | None) */
static PyObject *Context_take(Context *c, PyObject *unused) {
    PyObject *features = Py_None, *counts = Py_None, *headers = Py_None, *lines = NULL, *result = NULL;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (c->features != c->features_at_start) {
        Py_DECREF(features);
        features = PyLong_FromLong(c->features);
        if (features == NULL) goto done;
        c->features_at_start = c->features;
    }
    if (counts_changed(c)) {
        Py_DECREF(counts);
        counts = Py_BuildValue("(lLlL)", c->messages, c->bytes, c->dropped, c->dropped_bytes);
        if (counts == NULL) goto done;
        counts_taken(c);
    }
    lines = PyList_New((Py_ssize_t)c->n_lines);
    if (lines == NULL) goto done;
    for (size_t i = 0; i < c->n_lines; i++) {
        log_line *line = &c->lines[i];
        PyObject *text = line_text(line);
        PyObject *item = text ? Py_BuildValue("(iN)", line->level, text) : NULL;
        if (item == NULL) goto done;
        PyList_SET_ITEM(lines, (Py_ssize_t)i, item);
    }
    if (c->headers_changed) {
        Py_DECREF(headers);
        headers = PyList_New((Py_ssize_t)c->n_headers);
        if (headers == NULL) goto done;
        for (size_t i = 0; i < c->n_headers; i++) {
            header *h = &c->headers[i];
            PyObject *item = Py_BuildValue("(y#y#)", h->name, (Py_ssize_t)h->name_len, h->value,
                                           (Py_ssize_t)h->value_len);
            if (item == NULL) goto done;
            PyList_SET_ITEM(headers, (Py_ssize_t)i, item);
        }
    }
    result = PyTuple_Pack(4, features, counts, lines, headers);
done:
    clear_lines(c);
    clear_headers(c);
    c->pending = 0;
    Py_XDECREF(features);
    Py_XDECREF(counts);
    Py_XDECREF(lines);
    Py_XDECREF(headers);
    return result;
}

/* -- apply: what a call recorded, made on its request and call log (runtime/accel.py's apply) ------- */

static PyObject *header_list_type; /* runtime.state.HeaderList: the response headers C recorded become one */
static PyObject *log_levels;       /* (LogLevel.DEBUG, INFO, WARN, ERROR): a recorded line's level + 1 */
static PyObject *s_size, *s_changed, *s_response_headers_property, *s_add, *s_log, *s_call_log;

/* setup_apply(HeaderList, levels): what apply() makes. */
static PyObject *setup_apply(PyObject *module, PyObject *args) {
    PyObject *type, *levels;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &type, &PyTuple_Type, &levels)) return NULL;
    if (PyTuple_GET_SIZE(levels) != 4) {
        PyErr_SetString(PyExc_ValueError, "four log levels: debug, info, warn, error");
        return NULL;
    }
    Py_INCREF(type);
    Py_XSETREF(header_list_type, type);
    Py_INCREF(levels);
    Py_XSETREF(log_levels, levels);
    Py_RETURN_NONE;
}

/* The response headers C recorded, as the HeaderList Python would have made by adding them one by one to
 * the empty one a request-phase state starts with: the same entries (names already lowercase), the same
 * size, changed. */
static PyObject *recorded_header_list(Context *c) {
    PyObject *entries = PyList_New((Py_ssize_t)c->n_headers);
    if (entries == NULL) return NULL;
    for (size_t i = 0; i < c->n_headers; i++) {
        header *h = &c->headers[i];
        PyObject *item = Py_BuildValue("(y#y#)", h->name, (Py_ssize_t)h->name_len, h->value, (Py_ssize_t)h->value_len);
        if (item == NULL) {
            Py_DECREF(entries);
            return NULL;
        }
        PyList_SET_ITEM(entries, (Py_ssize_t)i, item);
    }
    PyTypeObject *type = (PyTypeObject *)header_list_type;
    PyObject *headers = type->tp_alloc(type, 0); /* as HeaderList.__new__; its slots are set here */
    PyObject *size = PyLong_FromLongLong(c->headers_size);
    if (headers == NULL || size == NULL || PyObject_SetAttr(headers, s_entries, entries) < 0 ||
        PyObject_SetAttr(headers, s_size, size) < 0 || PyObject_SetAttr(headers, s_changed, Py_True) < 0)
        Py_CLEAR(headers);
    Py_XDECREF(size);
    Py_DECREF(entries);
    return headers;
}

static int apply_headers(Context *c, PyObject *state) {
    PyObject *held = PyObject_GetAttr(state, s_response_headers);
    if (held == NULL) return -1;
    int fresh = held == Py_None;
    Py_DECREF(held);
    if (fresh) {
        PyObject *phase = PyObject_GetAttr(state, s_phase);
        if (phase == NULL) return -1;
        fresh = phase == request_phase;
        Py_DECREF(phase);
    }
    if (fresh) { /* the common case: nothing but C touched the response headers in this call */
        PyObject *headers = recorded_header_list(c);
        if (headers == NULL) return -1;
        int failed = PyObject_SetAttr(state, s_response_headers, headers);
        Py_DECREF(headers);
        return failed;
    }
    /* as Python would: state.response_headers.add(name, value), one by one */
    PyObject *response = PyObject_GetAttr(state, s_response_headers_property);
    if (response == NULL) return -1;
    for (size_t i = 0; i < c->n_headers; i++) {
        header *h = &c->headers[i];
        PyObject *name = PyBytes_FromStringAndSize(h->name, (Py_ssize_t)h->name_len);
        PyObject *value = name ? PyBytes_FromStringAndSize(h->value, (Py_ssize_t)h->value_len) : NULL;
        PyObject *added = value ? PyObject_CallMethodObjArgs(response, s_add, name, value, NULL) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (added == NULL) {
            Py_DECREF(response);
            return -1;
        }
        Py_DECREF(added);
    }
    Py_DECREF(response);
    return 0;
}

static int set_long(PyObject *object, PyObject *name, long long value) {
    PyObject *number = PyLong_FromLongLong(value);
    if (number == NULL) return -1;
    int failed = PyObject_SetAttr(object, name, number);
    Py_DECREF(number);
    return failed;
}

/* apply(instance): make what the call in progress (or just ended) recorded in C on instance.state and
 * instance.call_log, and forget it: the features, the log counts, the log lines (instance.log, in order),
 * the response headers. */
static PyObject *apply(PyObject *module, PyObject *instance) {
    if (header_list_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup_apply() first");
        return NULL;
    }
    PyObject *accel = PyObject_GetAttr(instance, s_accel);
    if (accel == NULL) return NULL;
    if (!PyObject_TypeCheck(accel, &ContextType)) {
        Py_DECREF(accel);
        PyErr_SetString(PyExc_TypeError, "apply(instance): instance.accel is not a Context");
        return NULL;
    }
    Context *c = (Context *)accel;
    PyObject *state = PyObject_GetAttr(instance, s_state);
    int failed = state == NULL;
    if (!failed && c->features != c->features_at_start) {
        failed = set_long(state, s_features, c->features) < 0;
        c->features_at_start = c->features;
    }
    if (!failed && counts_changed(c)) {
        PyObject *log = c->call_log;
        failed = set_long(log, s_messages, c->messages) < 0 || set_long(log, s_bytes, c->bytes) < 0 ||
                 set_long(log, s_dropped, c->dropped) < 0 || set_long(log, s_dropped_bytes, c->dropped_bytes) < 0;
        counts_taken(c);
    }
    for (size_t i = 0; !failed && i < c->n_lines; i++) {
        log_line *line = &c->lines[i];
        PyObject *text = line_text(line);
        PyObject *logged = text ? PyObject_CallMethodObjArgs(instance, s_log, PyTuple_GET_ITEM(log_levels, line->level + 1),
                                                             text, NULL)
                                : NULL;
        Py_XDECREF(text);
        failed = logged == NULL;
        Py_XDECREF(logged);
    }
    if (!failed && c->headers_changed) failed = apply_headers(c, state) < 0;
    clear_lines(c);
    clear_headers(c);
    c->pending = 0;
    Py_XDECREF(state);
    Py_DECREF(accel);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

/* end_fast_call(instance, state, error): GuestInstance._end_fast_call, what the fast call has run after a call
 * Python must see.  C does it when the call succeeded, no Python ran in it and nothing recorded needs Python
 * to apply it (no log line, no log count): the features and response headers are applied here, and
 * instance.state is cleared; the log is handed over (instance._hand_over_log) if the call log holds any.
 * Otherwise, and for every failure, GuestInstance._finish_fast_call(state, error) does it all, in Python.
 * Exposed as a method descriptor, so that the class can hold it as its _end_fast_call. */
static PyObject *s_finish_fast_call, *s_hand_over_log, *s_lines;

static int call_log_holds_any(PyObject *log) {
    PyObject *names[3] = {s_lines, s_messages, s_dropped};
    for (int i = 0; i < 3; i++) {
        PyObject *value = PyObject_GetAttr(log, names[i]);
        if (value == NULL) return -1;
        int truth = PyObject_IsTrue(value);
        Py_DECREF(value);
        if (truth != 0) return truth;
    }
    return 0;
}

static PyObject *end_fast_call(PyObject *instance, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_end_fast_call(state, error)");
        return NULL;
    }
    PyObject *state = args[0], *error = args[1];
    PyObject *accel = PyObject_GetAttr(instance, s_accel);
    if (accel == NULL) return NULL;
    Context *c = PyObject_TypeCheck(accel, &ContextType) ? (Context *)accel : NULL;
    if (c == NULL || error != Py_None || c->target_set || c->n_lines || header_list_type == NULL ||
        counts_changed(c)) {
        Py_DECREF(accel);
        return PyObject_CallMethodObjArgs(instance, s_finish_fast_call, state, error, NULL);
    }
    int failed = 0;
    if (c->pending) { /* as apply(): only features and headers can be left to apply here */
        if (c->features != c->features_at_start) {
            failed = set_long(state, s_features, c->features) < 0;
            c->features_at_start = c->features;
        }
        if (!failed && c->headers_changed) failed = apply_headers(c, state) < 0;
        clear_headers(c);
        c->pending = 0;
    }
    Py_DECREF(accel);
    /* As _finish_fast_call's finally block, in order: a failure to apply ends it there. */
    if (failed || PyObject_SetAttr(instance, s_state, Py_None) < 0) return NULL;
    PyObject *log = PyObject_GetAttr(instance, s_call_log);
    int holds = log == NULL ? -1 : call_log_holds_any(log);
    Py_XDECREF(log);
    if (holds < 0) return NULL;
    if (holds) {
        PyObject *handed = PyObject_CallMethodOneArg(instance, s_hand_over_log, state);
        if (handed == NULL) return NULL;
        Py_DECREF(handed);
    }
    Py_RETURN_NONE;
}

static PyMethodDef end_fast_call_def = {
    "_end_fast_call", (PyCFunction)(void (*)(void))end_fast_call, METH_FASTCALL,
    "_end_fast_call(state, error): after a fast call Python must see (GuestInstance._finish_fast_call, in C "
    "for the common case)."};

static PyMethodDef Context_methods[] = {
    {"call", (PyCFunction)(void (*)(void))Context_call, METH_FASTCALL,
     "call(export, hold_gil, instance, state, *args): call a guest export; the first result slot."},
    {"take", (PyCFunction)Context_take, METH_NOARGS, "What the call recorded, to apply to the request; and forget it."},
    {"prepare_fast", (PyCFunction)Context_prepare_fast, METH_VARARGS,
     "prepare_fast(request_export, response_export): call_request/call_response may serve this instance."},
    {NULL}};

static PyMemberDef Context_members[] = {
    {"pending", T_INT, offsetof(Context, pending), READONLY, "Whether take() has anything to apply."}, {NULL}};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.runtime._accel.Context",
    .tp_basicsize = sizeof(Context),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Context_new,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_methods = Context_methods,
    .tp_members = Context_members,
    .tp_doc = "Context(context, memory, memory_owner, config, call_log, log_messages, log_bytes, imports): imports is a bit per host id",
};

/* -- module functions ------------------------------------------------------------------- */

static void *resolve(void *handle, const char *name) {
    void *address = dlsym(handle, name);
    if (address == NULL) PyErr_Format(PyExc_RuntimeError, "wasmtime's library has no %s", name);
    return address;
}

static PyObject *setup(PyObject *module, PyObject *args) {
    unsigned long long handle;
    long major;
    PyObject *sync, *on_error, *on_trap, *on_timeout, *phase;
    if (!PyArg_ParseTuple(args, "KlOOOOO", &handle, &major, &sync, &on_error, &on_trap, &on_timeout, &phase))
        return NULL;
    int known = 0;
    for (size_t i = 0; i < sizeof(DECLARED_MAJORS) / sizeof(DECLARED_MAJORS[0]); i++)
        known |= DECLARED_MAJORS[i] == major;
    if (!known) {
        PyErr_Format(PyExc_RuntimeError, "declared for wasmtime 50 and 51, not %ld", major);
        return NULL;
    }
    void *h = (void *)(uintptr_t)handle;
    if (!(*(void **)&w_func_call_unchecked = resolve(h, "wasmtime_func_call_unchecked")) ||
        !(*(void **)&w_set_epoch_deadline = resolve(h, "wasmtime_context_set_epoch_deadline")) ||
        !(*(void **)&w_memory_data = resolve(h, "wasmtime_memory_data")) ||
        !(*(void **)&w_memory_data_size = resolve(h, "wasmtime_memory_data_size")) ||
        !(*(void **)&w_store_epoch_deadline_callback = resolve(h, "wasmtime_store_epoch_deadline_callback")) ||
        !(*(void **)&w_error_new = resolve(h, "wasmtime_error_new")) ||
        !(*(void **)&w_error_delete = resolve(h, "wasmtime_error_delete")))
        return NULL;
    Py_INCREF(sync);
    Py_XSETREF(sync_hook, sync);
    Py_INCREF(on_error);
    Py_XSETREF(error_hook, on_error);
    Py_INCREF(on_trap);
    Py_XSETREF(trap_hook, on_trap);
    Py_INCREF(on_timeout);
    Py_XSETREF(timeout_hook, on_timeout);
    Py_INCREF(phase);
    Py_XSETREF(request_phase, phase);
    ready = 1;
    Py_RETURN_NONE;
}

static PyObject *callback_address(PyObject *module, PyObject *unused) {
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "setup() first");
        return NULL;
    }
    return PyLong_FromVoidPtr((void *)(uintptr_t)host_callback);
}

static PyMethodDef module_methods[] = {
    {"setup", setup, METH_VARARGS, "setup(dl_handle, wasmtime_major, sync, on_error, on_trap, on_timeout, request_phase)"},
    {"callback_address", callback_address, METH_NOARGS, "The C callback every http_handler function is defined with."},
    {"install_time_limit", install_time_limit, METH_O, "install_time_limit(store): calls past their limit end."},
    {"run_inline", (PyCFunction)(void (*)(void))run_inline, METH_FASTCALL,
     "run_inline(work, on_result, on_error, still_wanted=None): web.runners.InlineRunner.run, in C."},
    {"setup_calls", setup_calls, METH_VARARGS, "setup_calls(current, engine_globals, no_observer)"},
    {"setup_apply", setup_apply, METH_VARARGS, "setup_apply(HeaderList, levels): what apply() makes."},
    {"apply", apply, METH_O, "apply(instance): make what the call recorded in C on its request and call log."},
    {"call_request", (PyCFunction)(void (*)(void))call_request, METH_FASTCALL,
     "call_request(instance, state, inline): GuestInstance.request_call, without Python when nothing needs it."},
    {"call_response", (PyCFunction)(void (*)(void))call_response, METH_FASTCALL,
     "call_response(instance, state, req_ctx, is_error, inline): GuestInstance.handle_response, likewise."},
    {NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_accel", "The compiled guest-call path.", -1,
                                        module_methods};

#define INTERN(var, text)                                                                                              \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__accel(void) {
    INTERN(s_phase, "phase");
    INTERN(s_features, "features");
    INTERN(s_method, "method");
    INTERN(s_uri, "uri");
    INTERN(s_status, "status");
    INTERN(s_max_buffer_bytes, "max_buffer_bytes");
    INTERN(s_response_headers, "_response_headers");
    INTERN(s_request_header_values, "request_header_values");
    INTERN(s_request_headers, "_request_headers");
    INTERN(s_read_request_headers, "read_request_headers");
    INTERN(s_inline, "inline");
    INTERN(s_messages, "messages");
    INTERN(s_bytes, "bytes");
    INTERN(s_dropped, "dropped");
    INTERN(s_dropped_bytes, "dropped_bytes");
    INTERN(s_log_level, "log_level");
    INTERN(s_accel, "accel");
    INTERN(s_guest, "guest");
    INTERN(s_observer, "observer");
    INTERN(s_state, "state");
    INTERN(s_target, "target");
    INTERN(s_serving, "serving");
    INTERN(s_calls_may_hold_gil, "calls_may_hold_gil");
    INTERN(s_request_call, "request_call");
    INTERN(s_handle_response, "handle_response");
    INTERN(s_end_fast_call, "_end_fast_call");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_check_size, "check_size");
    INTERN(s_body_length, "body_length");
    INTERN(s_is_error, "is_error");
    INTERN(s_entries, "_entries");
    INTERN(s_size, "_size");
    INTERN(s_changed, "changed");
    INTERN(s_response_headers_property, "response_headers");
    INTERN(s_add, "add");
    INTERN(s_log, "log");
    INTERN(s_call_log, "call_log");
    INTERN(s_lines, "lines");
    INTERN(s_finish_fast_call, "_finish_fast_call");
    INTERN(s_hand_over_log, "_hand_over_log");
    INTERN(s_acquire_idle, "acquire_idle");
    if (PyType_Ready(&HostEnvType) < 0 || PyType_Ready(&ExportType) < 0 || PyType_Ready(&ContextType) < 0 ||
        PyType_Ready(&SessionType) < 0 || PyType_Ready(&LaneType) < 0 || PyType_Ready(&SeatType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    Py_INCREF(&HostEnvType);
    Py_INCREF(&ExportType);
    Py_INCREF(&ContextType);
    Py_INCREF(&SessionType);
    Py_INCREF(&LaneType);
    Py_INCREF(&SeatType);
    if (PyModule_AddObject(module, "HostEnv", (PyObject *)&HostEnvType) < 0 ||
        PyModule_AddObject(module, "Export", (PyObject *)&ExportType) < 0 ||
        PyModule_AddObject(module, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObject(module, "Session", (PyObject *)&SessionType) < 0 ||
        PyModule_AddObject(module, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObject(module, "Seat", (PyObject *)&SeatType) < 0 ||
        PyModule_AddIntConstant(module, "HOST_FUNCTIONS", H_COUNT) < 0 ||
        PyModule_AddObject(module, "end_fast_call", PyDescr_NewMethod(&PyBaseObject_Type, &end_fast_call_def)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
