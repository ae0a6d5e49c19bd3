/*
 * The optional compiled fast path of the twisted.web side (see web/fast.py).
 *
 * Three base types, each the storage and the hot methods of a Python class
 * whose other methods stay in Python:
 *
 *   FilterCore       - filter.RequestFilter: __init__, start, _after_handle_request,
 *                      _downstream_finish, _after_handle_response;
 *   StreamedSinkCore - sinks.StreamedSink: __init__, write, complete;
 *   InterceptionCore - interception.Interception: __init__, remove.
 *
 * Each hot method does in C what its Python twin does for the common case
 * (a guest that passes the request on unchanged, a streamed response, one
 * guest on the request) and hands every other case, untouched, to the Python
 * method of the same name: the C side decides before it changes anything, so
 * the Python method runs from the same state it would have run from alone.
 * The Python classes are the pure path and stay complete on their own.
 *
 * The types are static and collected by the cycle collector; their instances are those of the
 * Python subclasses (web/fast.py), whose own traverse visits the (heap) subclass, so the
 * traverse functions here visit the fields only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#if PY_VERSION_HEX < 0x030D0000
#define PyObject_GetOptionalAttr _PyObject_LookupAttr
#endif

/* -- what setup() is given --------------------------------------------------------------- */

static int ready = 0;
/* filter */
static PyObject *state_type, *inline_runner_type, *no_observer, *not_read, *monotonic, *passed, *not_done_yet;
static PyObject *stage_guest_request, *stage_downstream, *stage_guest_response, *stage_done;
static long buffer_request, buffer_response;
static PyObject *py_filter_init, *py_start, *py_after_handle_request, *py_downstream_finish, *py_after_handle_response;
static PyTypeObject *fast_sink_type, *fast_interception_type;
/* sink */
static PyObject *py_sink_init, *py_write, *py_complete, *no_body_codes, *encoder_attribute, *raw_header_map,
    *content_length_name, *content_length_header;
/* interception */
static PyObject *context_attribute, *context_of, *py_interception_init, *py_remove, *all_methods, *streamed_methods;

static PyObject *s_guest, *s_runner, *s_run, *s_method, *s_uri, *s_content, *s_max_buffer_bytes,
    *s_request, *s_client_headers, *s_request_headers, *s_session, *s_observer, *s_handle_request, *s_handle_response,
    *s_after_handle_request, *s_handle_request_failed, *s_after_handle_response, *s_handle_response_failed,
    *s_downstream_finish, *s_downstream_failed, *s_features, *s_touched, *s_name, *s_enter_response_phase,
    *s_render_downstream, *s_report, *s_code, *s_started_writing, *s_response_headers, *s_remove_header,
    *s_finish, *s_write, *s_processing_failed, *s_register_producer, *s_unregister_producer,
    *s_register_producer_sink, *s_unregister_producer_sink, *s_buffered, *s_interception, *s_log_length_mismatch,
    *s_get, *s_may_read_request_body, *s_watch_client, *s_client_there, *s_response_body, *s_note_dropped, *s_apply_changes, *s_forward, *s_remove, *s_complete, *s_head, *s_wrote_more, *s_excess_not_sent, *kw_inline;
static PyObject *empty_bytes, *zero, *float_zero, *int_100, *int_200, *int_204;

static int truth(PyObject *value) {
    if (value == Py_True) return 1;
    if (value == Py_False || value == Py_None) return 0;
    return PyObject_IsTrue(value);
}

static void set_field(PyObject **field, PyObject *value) { Py_XSETREF(*field, Py_NewRef(value)); }

/* Each core type lists its fields once (an X-macro); its struct, traverse, clear and "every field is
 * set" check are made from that list, so that none of them can miss a field. */
#define DECLARE_FIELD(field) PyObject *field;
#define VISIT_FIELD(field) Py_VISIT(self->field);
#define CLEAR_FIELD(field) Py_CLEAR(self->field);
#define FIELD_IS_SET(field) &&self->field

static int not_ready(void) {
    if (ready) return 0;
    PyErr_SetString(PyExc_RuntimeError, "twisted_httpwasm.web._fast: setup() was not called");
    return 1;
}

/* Python's ``function(self, *args, **kwargs)``: an __init__ handed to the Python class. */
static int call_init(PyObject *function, PyObject *self, PyObject *args, PyObject *kwargs) {
    PyObject *head = PyTuple_Pack(1, self);
    if (head == NULL) return -1;
    PyObject *full = PySequence_Concat(head, args);
    Py_DECREF(head);
    if (full == NULL) return -1;
    PyObject *done = PyObject_Call(function, full, kwargs);
    Py_DECREF(full);
    if (done == NULL) return -1;
    Py_DECREF(done);
    return 0;
}

/* ====================================================================================== */
/* StreamedSinkCore                                                                        */
/* ====================================================================================== */

#define SINK_FIELDS(X)                                                                                                 \
    X(request) X(prefix) X(guest_name) X(open) X(forward) X(held) X(declared) X(accepted) X(mismatch_logged)

typedef struct {
    PyObject_HEAD
    SINK_FIELDS(DECLARE_FIELD)
} Sink;

static int Sink_traverse(Sink *self, visitproc visit, void *arg) {
    SINK_FIELDS(VISIT_FIELD)
    return 0;
}

static int Sink_clear(Sink *self) {
    SINK_FIELDS(CLEAR_FIELD)
    return 0;
}

static void Sink_dealloc(Sink *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Sink_clear(self);
    type->tp_free((PyObject *)self);
}

/* StreamedSink.__init__(request, prefix, guest_name) */
static int Sink_init(Sink *self, PyObject *args, PyObject *kwargs) {
    if (not_ready()) return -1;
    if (kwargs != NULL || PyTuple_GET_SIZE(args) != 3) return call_init(py_sink_init, (PyObject *)self, args, kwargs);
    PyObject *request = PyTuple_GET_ITEM(args, 0);
    PyObject *forward = PyObject_GetAttr(request, s_write); /* the request's own write, or an outer guest's sink */
    if (forward == NULL) return -1;
    set_field(&self->request, request);
    set_field(&self->prefix, PyTuple_GET_ITEM(args, 1));
    set_field(&self->guest_name, PyTuple_GET_ITEM(args, 2));
    set_field(&self->open, Py_True);
    Py_XSETREF(self->forward, forward);
    set_field(&self->held, empty_bytes);
    set_field(&self->declared, Py_None);
    set_field(&self->accepted, zero);
    set_field(&self->mismatch_logged, Py_False);
    return 0;
}

/* Whether every field is set: one deleted from Python (``del sink._held``) sends the call to the
 * Python method, which raises the AttributeError that Python would. */
static int sink_whole(Sink *self) { return 1 SINK_FIELDS(FIELD_IS_SET); }

static PyObject *call_python(PyObject *function, PyObject *self, PyObject *arg) {
    PyObject *args[2] = {self, arg};
    return PyObject_Vectorcall(function, args, arg == NULL ? 1 : 2, NULL);
}

/* Whether ``request`` is answered without body bytes (HEAD, 1xx, 204, 304): -1 on error. */
static int bodiless(PyObject *request, PyObject *code) {
    PyObject *method = PyObject_GetAttr(request, s_method);
    if (method == NULL) return -1;
    int answer = PyObject_RichCompareBool(method, s_head, Py_EQ);
    Py_DECREF(method);
    if (answer != 0) return answer;
    answer = PySequence_Contains(no_body_codes, code);
    if (answer != 0) return answer;
    answer = PyObject_RichCompareBool(int_100, code, Py_LE);
    if (answer <= 0) return answer;
    return PyObject_RichCompareBool(code, int_200, Py_LT);
}

/* The Content-Length the body will be sent with (see StreamedSink.write): a new reference to an int or
 * None, or NULL with *slow set when only Python can say (a value past what C parses here). */
static PyObject *declared_length(PyObject *request, int *slow) {
    PyObject *encoder;
    if (PyObject_GetOptionalAttr(request, encoder_attribute, &encoder) < 0) return NULL;
    int encoded = encoder != NULL && encoder != Py_None;
    Py_XDECREF(encoder);
    if (encoded) Py_RETURN_NONE; /* an encoder (gzip) drops Content-Length and changes the length */
    PyObject *headers = PyObject_GetAttr(request, s_response_headers);
    if (headers == NULL) return NULL;
    PyObject *map = PyObject_CallOneArg(raw_header_map, headers);
    Py_DECREF(headers);
    if (map == NULL) return NULL;
    PyObject *length;
    if (PyDict_CheckExact(map)) {
        length = PyDict_GetItemWithError(map, content_length_name);
        Py_XINCREF(length);
        if (length == NULL && PyErr_Occurred()) {
            Py_DECREF(map);
            return NULL;
        }
    } else {
        length = PyObject_CallMethodOneArg(map, s_get, content_length_name);
        if (length == NULL) {
            Py_DECREF(map);
            return NULL;
        }
    }
    Py_DECREF(map);
    if (length == NULL || length == Py_None) {
        Py_XDECREF(length);
        Py_RETURN_NONE;
    }
    if (!PyList_CheckExact(length)) {
        Py_DECREF(length);
        *slow = 1;
        return NULL;
    }
    if (PyList_GET_SIZE(length) == 0) {
        Py_DECREF(length);
        Py_RETURN_NONE;
    }
    PyObject *first = PyList_GET_ITEM(length, 0);
    if (!PyBytes_CheckExact(first) || PyBytes_GET_SIZE(first) > 18) {
        Py_DECREF(length);
        *slow = 1;
        return NULL;
    }
    const char *text = PyBytes_AS_STRING(first);
    Py_ssize_t size = PyBytes_GET_SIZE(first);
    long long value = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (text[i] < '0' || text[i] > '9') {
            Py_DECREF(length);
            Py_RETURN_NONE; /* not all digits: bytes.isdigit() is False */
        }
        value = value * 10 + (text[i] - '0');
    }
    Py_DECREF(length);
    if (size == 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(value);
}

static PyObject *Sink_write(Sink *self, PyObject *data) {
    if (not_ready()) return NULL;
    if (!sink_whole(self)) return call_python(py_write, (PyObject *)self, data);
    int open = truth(self->open);
    if (open <= 0) {
        if (open < 0) return NULL;
        Py_RETURN_NONE; /* a late write from a downstream whose request already ended */
    }
    if (!PyBytes_CheckExact(data) || !PyLong_CheckExact(self->accepted)) return call_python(py_write, (PyObject *)self, data);
    PyObject *request = self->request;
    PyObject *value = PyObject_GetAttr(request, s_started_writing);
    if (value == NULL) return NULL;
    int started = truth(value);
    Py_DECREF(value);
    if (started < 0) return NULL;
    PyObject *declared; /* a new reference: None or an int */
    if (!started) {
        int prefixed = truth(self->prefix);
        if (prefixed != 0) return prefixed < 0 ? NULL : call_python(py_write, (PyObject *)self, data);
        PyObject *code = PyObject_GetAttr(request, s_code);
        if (code == NULL) return NULL;
        int no_body = bodiless(request, code);
        Py_DECREF(code);
        if (no_body != 0) {
            if (no_body < 0) return NULL;
            Py_RETURN_NONE; /* bodiless: the headers are the whole response, finish() sends them */
        }
        int slow = 0;
        declared = declared_length(request, &slow);
        if (declared == NULL) return slow ? call_python(py_write, (PyObject *)self, data) : NULL;
        set_field(&self->declared, declared);
        if (declared != Py_None && PyLong_AsLongLong(declared) == 0) {
            Py_DECREF(declared);
            Py_RETURN_NONE; /* bytes past a length of 0 would desync the connection */
        }
    } else {
        declared = Py_NewRef(self->declared);
        if (declared != Py_None && !PyLong_CheckExact(declared)) {
            Py_DECREF(declared);
            return call_python(py_write, (PyObject *)self, data);
        }
    }
    long long limit = -1;
    if (declared != Py_None) {
        limit = PyLong_AsLongLong(declared);
        if (limit == -1 && PyErr_Occurred()) {
            Py_DECREF(declared);
            return NULL;
        }
    }
    Py_DECREF(declared);
    long long before = PyLong_AsLongLong(self->accepted);
    if (before == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    long long accepted = before + size;
    PyObject *chunk = Py_NewRef(data);
    int over = limit >= 0 && accepted > limit;
    if (over) {
        /* Bytes past the announced length would be read as the start of the next response. */
        Py_SETREF(chunk, PyBytes_FromStringAndSize(PyBytes_AS_STRING(data), size - (Py_ssize_t)(accepted - limit)));
        if (chunk == NULL) return NULL;
        accepted = limit;
    }
    PyObject *number = PyLong_FromLongLong(accepted);
    if (number == NULL) {
        Py_DECREF(chunk);
        return NULL;
    }
    Py_XSETREF(self->accepted, number);
    if (over) {
        PyObject *done = PyObject_CallMethodObjArgs((PyObject *)self, s_log_length_mismatch, s_wrote_more,
                                                    s_excess_not_sent, NULL);
        if (done == NULL) {
            Py_DECREF(chunk);
            return NULL;
        }
        Py_DECREF(done);
    }
    if (limit >= 0 && accepted >= limit) {
        /* The write that completes the body waits whole for handle_response (see StreamedSink.write). */
        if (PyBytes_GET_SIZE(chunk)) {
            PyObject *held = PyNumber_InPlaceAdd(self->held, chunk);
            Py_DECREF(chunk);
            if (held == NULL) return NULL;
            Py_XSETREF(self->held, held);
            Py_RETURN_NONE;
        }
        Py_DECREF(chunk);
        Py_RETURN_NONE;
    }
    int forward = PyBytes_GET_SIZE(chunk) != 0;
    if (!forward) {
        value = PyObject_GetAttr(request, s_started_writing);
        if (value == NULL) {
            Py_DECREF(chunk);
            return NULL;
        }
        forward = !truth(value);
        Py_DECREF(value);
    }
    if (forward) {
        PyObject *done = PyObject_CallOneArg(self->forward, chunk);
        Py_DECREF(chunk);
        if (done == NULL) return NULL;
        Py_DECREF(done);
        Py_RETURN_NONE;
    }
    Py_DECREF(chunk);
    Py_RETURN_NONE;
}

static PyObject *Sink_complete(Sink *self, PyObject *unused) {
    if (not_ready()) return NULL;
    if (!sink_whole(self)) return call_python(py_complete, (PyObject *)self, NULL);
    PyObject *request = self->request;
    if (self->declared != Py_None) {
        /* A body short of its Content-Length is Python's to log and cut. */
        int short_body = PyObject_RichCompareBool(self->accepted, self->declared, Py_LT);
        if (short_body < 0) return NULL;
        if (short_body) {
            PyObject *value = PyObject_GetAttr(request, s_started_writing);
            if (value == NULL) return NULL;
            int started = truth(value);
            Py_DECREF(value);
            if (started != 0) return started < 0 ? NULL : call_python(py_complete, (PyObject *)self, NULL);
        }
    }
    PyObject *held = self->held;
    self->held = Py_NewRef(empty_bytes);
    int has_held = truth(held);
    if (has_held < 0) {
        Py_DECREF(held);
        return NULL;
    }
    if (has_held) {
        PyObject *done = PyObject_CallMethodOneArg(request, s_write, held);
        Py_DECREF(held);
        if (done == NULL) return NULL;
        Py_DECREF(done);
    } else {
        Py_DECREF(held);
        PyObject *value = PyObject_GetAttr(request, s_started_writing);
        if (value == NULL) return NULL;
        int started = truth(value);
        Py_DECREF(value);
        if (started < 0) return NULL;
        if (!started) {
            PyObject *code = PyObject_GetAttr(request, s_code);
            if (code == NULL) return NULL;
            /* 1xx and 204 responses carry no Content-Length (RFC 9110 8.6); Twisted's render sets one. */
            int drop = PyObject_RichCompareBool(code, int_204, Py_EQ);
            if (drop == 0) {
                drop = PyObject_RichCompareBool(int_100, code, Py_LE);
                if (drop > 0) drop = PyObject_RichCompareBool(code, int_200, Py_LT);
            }
            Py_DECREF(code);
            if (drop < 0) return NULL;
            if (drop) {
                PyObject *headers = PyObject_GetAttr(request, s_response_headers);
                if (headers == NULL) return NULL;
                PyObject *done = PyObject_CallMethodOneArg(headers, s_remove_header, content_length_header);
                Py_DECREF(headers);
                if (done == NULL) return NULL;
                Py_DECREF(done);
            }
        }
    }
    return PyObject_CallMethodNoArgs(request, s_finish);
}

static PyMethodDef Sink_methods[] = {
    {"write", (PyCFunction)Sink_write, METH_O, "StreamedSink.write, in C."},
    {"complete", (PyCFunction)Sink_complete, METH_NOARGS, "StreamedSink.complete, in C."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Sink_members[] = {
    {"request", T_OBJECT_EX, offsetof(Sink, request), 0, NULL},
    {"prefix", T_OBJECT_EX, offsetof(Sink, prefix), 0, NULL},
    {"guest_name", T_OBJECT_EX, offsetof(Sink, guest_name), 0, NULL},
    {"open", T_OBJECT_EX, offsetof(Sink, open), 0, NULL},
    {"forward", T_OBJECT_EX, offsetof(Sink, forward), 0, NULL},
    {"_held", T_OBJECT_EX, offsetof(Sink, held), 0, NULL},
    {"_declared", T_OBJECT_EX, offsetof(Sink, declared), 0, NULL},
    {"_accepted", T_OBJECT_EX, offsetof(Sink, accepted), 0, NULL},
    {"_mismatch_logged", T_OBJECT_EX, offsetof(Sink, mismatch_logged), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SinkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.web._fast.StreamedSinkCore",
    .tp_basicsize = sizeof(Sink),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The storage and hot methods of sinks.StreamedSink.",
    .tp_traverse = (traverseproc)Sink_traverse,
    .tp_clear = (inquiry)Sink_clear,
    .tp_dealloc = (destructor)Sink_dealloc,
    .tp_init = (initproc)Sink_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = Sink_methods,
    .tp_members = Sink_members,
};

/* ====================================================================================== */
/* InterceptionCore                                                                        */
/* ====================================================================================== */

#define INTERCEPTION_FIELDS(X) X(context) X(installed) X(outer) X(request) X(saved) X(sink)

typedef struct {
    PyObject_HEAD
    INTERCEPTION_FIELDS(DECLARE_FIELD)
} Interception;

static int Interception_traverse(Interception *self, visitproc visit, void *arg) {
    INTERCEPTION_FIELDS(VISIT_FIELD)
    return 0;
}

static int Interception_clear(Interception *self) {
    INTERCEPTION_FIELDS(CLEAR_FIELD)
    return 0;
}

/* Whether every field is set (see sink_whole). */
static int interception_whole(Interception *self) { return 1 INTERCEPTION_FIELDS(FIELD_IS_SET); }

static void Interception_dealloc(Interception *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Interception_clear(self);
    type->tp_free((PyObject *)self);
}

static int set_method_of(PyObject *target, PyObject *name, PyObject *owner, PyObject *method_name) {
    PyObject *method = PyObject_GetAttr(owner, method_name);
    if (method == NULL) return -1;
    int done = PyObject_SetAttr(target, name, method);
    Py_DECREF(method);
    return done;
}

/* Interception.__init__(request, sink, finish, failed) */
static int Interception_init(Interception *self, PyObject *args, PyObject *kwargs) {
    if (not_ready()) return -1;
    if (kwargs != NULL || PyTuple_GET_SIZE(args) != 4) return call_init(py_interception_init, (PyObject *)self, args, kwargs);
    PyObject *request = PyTuple_GET_ITEM(args, 0), *sink = PyTuple_GET_ITEM(args, 1);
    PyObject *finish = PyTuple_GET_ITEM(args, 2), *failed = PyTuple_GET_ITEM(args, 3);
    PyObject *context;
    if (PyObject_GetOptionalAttr(request, context_attribute, &context) < 0) return -1;
    int made = context == NULL ? 0 : truth(context);
    if (made < 0) {
        Py_DECREF(context);
        return -1;
    }
    if (!made) {
        Py_XDECREF(context);
        context = PyObject_CallOneArg(context_of, request);
        if (context == NULL) return -1;
    }
    PyObject *outer = PyObject_GetAttr(context, s_interception);
    if (outer == NULL) {
        Py_DECREF(context);
        return -1;
    }
    Py_DECREF(outer);
    if (outer != Py_None) { /* chained: an outer guest's interception is kept, by Python */
        Py_DECREF(context);
        return call_init(py_interception_init, (PyObject *)self, args, kwargs);
    }
    set_field(&self->request, request);
    set_field(&self->sink, sink);
    Py_XSETREF(self->context, context);
    set_field(&self->outer, Py_None);
    set_field(&self->saved, Py_None);
    if (PyObject_SetAttr(context, s_interception, (PyObject *)self) < 0) return -1;
    set_field(&self->installed, Py_True);
    PyObject *write = PyObject_GetAttr(request, s_write);
    if (write == NULL) return -1;
    int failed_set = PyObject_SetAttr(sink, s_forward, write);
    Py_DECREF(write);
    if (failed_set < 0) return -1;
    if (set_method_of(request, s_write, sink, s_write) < 0) return -1;
    if (PyObject_SetAttr(request, s_finish, finish) < 0) return -1;
    if (PyObject_SetAttr(request, s_processing_failed, failed) < 0) return -1;
    PyObject *buffered = PyObject_GetAttr(sink, s_buffered);
    if (buffered == NULL) return -1;
    int is_buffered = truth(buffered);
    Py_DECREF(buffered);
    if (is_buffered < 0) return -1;
    if (is_buffered) {
        if (set_method_of(request, s_register_producer, sink, s_register_producer_sink) < 0) return -1;
        if (set_method_of(request, s_unregister_producer, sink, s_unregister_producer_sink) < 0) return -1;
    }
    return 0;
}

static PyObject *Interception_remove(Interception *self, PyObject *unused) {
    if (not_ready()) return NULL;
    if (!interception_whole(self))
        return call_python(py_remove, (PyObject *)self, NULL); /* a field deleted from Python: as Python fails */
    int installed = truth(self->installed);
    if (installed <= 0) {
        if (installed < 0) return NULL;
        Py_RETURN_NONE; /* never touch what is not ours (an outer guest's, when chained) */
    }
    if (self->saved != Py_None) return call_python(py_remove, (PyObject *)self, NULL);
    PyObject *buffered = PyObject_GetAttr(self->sink, s_buffered);
    if (buffered == NULL) return NULL;
    int is_buffered = truth(buffered);
    Py_DECREF(buffered);
    if (is_buffered < 0) return NULL;
    set_field(&self->installed, Py_False);
    PyObject *request = self->request;
    if (PyObject_SetAttr(self->context, s_interception, self->outer) < 0) return NULL;
    PyObject *names = is_buffered ? all_methods : streamed_methods;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        if (PyObject_DelAttr(request, PyTuple_GET_ITEM(names, i)) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Interception_methods[] = {
    {"remove", (PyCFunction)Interception_remove, METH_NOARGS, "Interception.remove, in C."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Interception_members[] = {
    {"context", T_OBJECT_EX, offsetof(Interception, context), 0, NULL},
    {"installed", T_OBJECT_EX, offsetof(Interception, installed), 0, NULL},
    {"outer", T_OBJECT_EX, offsetof(Interception, outer), 0, NULL},
    {"request", T_OBJECT_EX, offsetof(Interception, request), 0, NULL},
    {"saved", T_OBJECT_EX, offsetof(Interception, saved), 0, NULL},
    {"sink", T_OBJECT_EX, offsetof(Interception, sink), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject InterceptionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.web._fast.InterceptionCore",
    .tp_basicsize = sizeof(Interception),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The storage and hot methods of interception.Interception.",
    .tp_traverse = (traverseproc)Interception_traverse,
    .tp_clear = (inquiry)Interception_clear,
    .tp_dealloc = (destructor)Interception_dealloc,
    .tp_init = (initproc)Interception_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = Interception_methods,
    .tp_members = Interception_members,
};

/* ====================================================================================== */
/* FilterCore                                                                              */
/* ====================================================================================== */

#define FILTER_FIELDS(X)                                                                                               \
    X(settings) X(guest) X(request) X(state) X(inline_) X(session) X(stage) X(client_gone) X(sink) X(interception)    \
        X(downstream_failure) X(then) X(detached_body) X(host_connection) X(original_body) X(downstream_code)          \
            X(guest_body_reserved) X(reported) X(observer) X(started)

typedef struct {
    PyObject_HEAD
    FILTER_FIELDS(DECLARE_FIELD)
} Filter;

static int Filter_traverse(Filter *self, visitproc visit, void *arg) {
    FILTER_FIELDS(VISIT_FIELD)
    return 0;
}

static int Filter_clear(Filter *self) {
    FILTER_FIELDS(CLEAR_FIELD)
    return 0;
}

static void Filter_dealloc(Filter *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Filter_clear(self);
    type->tp_free((PyObject *)self);
}

/* RequestFilter.__init__(settings, request) */
static int Filter_init(Filter *self, PyObject *args, PyObject *kwargs) {
    if (not_ready()) return -1;
    if (kwargs != NULL || PyTuple_GET_SIZE(args) != 2) return call_init(py_filter_init, (PyObject *)self, args, kwargs);
    PyObject *settings = PyTuple_GET_ITEM(args, 0), *request = PyTuple_GET_ITEM(args, 1);
    set_field(&self->settings, settings);
    PyObject *guest = PyObject_GetAttr(settings, s_guest); /* read once: a guest replaced mid-request keeps this one */
    if (guest == NULL) return -1;
    Py_XSETREF(self->guest, guest);
    set_field(&self->request, request);
    PyObject *state_args[4] = {NULL, NULL, NULL, NULL};
    PyObject *state = NULL;
    if ((state_args[0] = PyObject_GetAttr(request, s_method)) != NULL &&
        (state_args[1] = PyObject_GetAttr(request, s_uri)) != NULL &&
        (state_args[2] = PyObject_GetAttr(request, s_content)) != NULL &&
        (state_args[3] = PyObject_GetAttr(guest, s_max_buffer_bytes)) != NULL)
        state = PyObject_Vectorcall(state_type, state_args, 4, NULL);
    for (int i = 0; i < 4; i++) Py_XDECREF(state_args[i]);
    if (state == NULL) return -1;
    Py_XSETREF(self->state, state);
    if (PyObject_SetAttr(state, s_request, request) < 0) return -1;
    PyObject *headers = PyObject_GetAttr(request, s_request_headers);
    if (headers == NULL) return -1;
    int failed = PyObject_SetAttr(state, s_client_headers, headers);
    Py_DECREF(headers);
    if (failed < 0) return -1;
    PyObject *runner = PyObject_GetAttr(settings, s_runner);
    if (runner == NULL) return -1;
    PyObject *is_inline = (PyObject *)Py_TYPE(runner) == inline_runner_type ? Py_True : Py_False;
    Py_DECREF(runner);
    set_field(&self->inline_, is_inline);
    PyObject *session_args[3] = {guest, state, is_inline};
    PyObject *session = PyObject_VectorcallMethod(s_session, session_args, 2, kw_inline);
    if (session == NULL) return -1;
    Py_XSETREF(self->session, session);
    set_field(&self->stage, stage_guest_request);
    set_field(&self->client_gone, Py_False);
    set_field(&self->sink, Py_None);
    set_field(&self->interception, Py_None);
    set_field(&self->downstream_failure, Py_None);
    set_field(&self->then, Py_None);
    set_field(&self->detached_body, Py_None);
    set_field(&self->host_connection, not_read);
    set_field(&self->original_body, Py_None);
    set_field(&self->downstream_code, zero);
    set_field(&self->guest_body_reserved, zero);
    set_field(&self->reported, Py_False);
    PyObject *observer = PyObject_GetAttr(guest, s_observer);
    if (observer == NULL) return -1;
    if (observer == no_observer) Py_SETREF(observer, Py_NewRef(Py_None));
    Py_XSETREF(self->observer, observer);
    if (observer != Py_None) {
        PyObject *now = PyObject_CallNoArgs(monotonic);
        if (now == NULL) return -1;
        Py_XSETREF(self->started, now);
    } else {
        set_field(&self->started, float_zero);
    }
    return 0;
}

/* Whether every field is set (see sink_whole). */
static int filter_whole(Filter *self) { return 1 FILTER_FIELDS(FIELD_IS_SET); }

/* runner.run(work, self.<on_result>, self.<on_error>[, self.<still_wanted>]) */
static PyObject *run_call(Filter *self, PyObject *work_name, PyObject *on_result_name, PyObject *on_error_name,
                          PyObject *still_wanted_name) {
    PyObject *runner = NULL, *work = NULL, *on_result = NULL, *on_error = NULL, *still_wanted = NULL, *done = NULL;
    if ((runner = PyObject_GetAttr(self->settings, s_runner)) != NULL &&
        (work = PyObject_GetAttr(self->session, work_name)) != NULL &&
        (on_result = PyObject_GetAttr((PyObject *)self, on_result_name)) != NULL &&
        (on_error = PyObject_GetAttr((PyObject *)self, on_error_name)) != NULL &&
        (still_wanted_name == NULL || (still_wanted = PyObject_GetAttr((PyObject *)self, still_wanted_name)) != NULL)) {
        PyObject *args[5] = {runner, work, on_result, on_error, still_wanted};
        done = PyObject_VectorcallMethod(s_run, args, still_wanted == NULL ? 4 : 5, NULL);
    }
    Py_XDECREF(runner);
    Py_XDECREF(work);
    Py_XDECREF(on_result);
    Py_XDECREF(on_error);
    Py_XDECREF(still_wanted);
    return done;
}

static PyObject *Filter_start(Filter *self, PyObject *unused) {
    if (not_ready()) return NULL;
    if (!filter_whole(self)) return call_python(py_start, (PyObject *)self, NULL);
    int is_inline = truth(self->inline_);
    if (is_inline < 0) return NULL;
    PyObject *done;
    if (is_inline) { /* the call starts now, for a client that was there a moment ago */
        done = run_call(self, s_handle_request, s_after_handle_request, s_handle_request_failed, NULL);
    } else {
        /* Twisted closes request.content when the client goes away, which must not happen under a guest
         * reading it in a worker: the request has no body until the call is over (see RequestFilter.start). */
        PyObject *may_read = PyObject_GetAttr(self->guest, s_may_read_request_body);
        if (may_read == NULL) return NULL;
        int detach = truth(may_read);
        Py_DECREF(may_read);
        if (detach < 0) return NULL;
        if (detach) {
            PyObject *body = PyObject_GetAttr(self->request, s_content);
            if (body == NULL) return NULL;
            Py_XSETREF(self->detached_body, body);
            if (PyObject_SetAttr(self->request, s_content, Py_None) < 0) return NULL;
        }
        done = PyObject_CallMethodNoArgs((PyObject *)self, s_watch_client);
        if (done == NULL) return NULL;
        Py_DECREF(done);
        done = run_call(self, s_handle_request, s_after_handle_request, s_handle_request_failed, s_client_there);
    }
    if (done == NULL) return NULL;
    Py_DECREF(done);
    return Py_NewRef(not_done_yet);
}

/* state.features as a C long, or -1 (with *slow set when it is not a plain int). */
static long features_of(PyObject *state, int *slow) {
    PyObject *features = PyObject_GetAttr(state, s_features);
    if (features == NULL) return -1;
    if (!PyLong_CheckExact(features)) {
        Py_DECREF(features);
        *slow = 1;
        return -1;
    }
    long value = PyLong_AsLong(features);
    Py_DECREF(features);
    if (value < 0) { /* past a C long, or negative: Python's to judge */
        PyErr_Clear();
        *slow = 1;
        return -1;
    }
    return value;
}

static PyObject *Filter_after_handle_request(Filter *self, PyObject *next) {
    if (not_ready()) return NULL;
    if (!filter_whole(self)) return call_python(py_after_handle_request, (PyObject *)self, next);
    int gone = truth(self->client_gone);
    if (gone < 0) return NULL;
    if (self->detached_body != Py_None && !gone) {
        /* What the Python method does first (_reattach_body): the request gets its body back. */
        if (PyObject_SetAttr(self->request, s_content, self->detached_body) < 0) return NULL;
        set_field(&self->detached_body, Py_None);
    }
    /* The common case only: the guest passed the request on, wrote no body before next, buffers nothing. */
    int fast = !gone;
    if (fast) {
        fast = truth(next);
        if (fast < 0) return NULL;
    }
    if (fast) {
        int slow = 0;
        long features = features_of(self->state, &slow);
        if (features == -1 && !slow) return NULL; /* the attribute could not be read */
        fast = !slow && !(features & (buffer_request | buffer_response));
    }
    int changed = 0;
    if (fast) {
        PyObject *touched = PyObject_CallMethodNoArgs(self->state, s_touched);
        if (touched == NULL) return NULL;
        changed = truth(touched);
        Py_DECREF(touched);
        if (changed < 0) return NULL;
    }
    if (fast && changed) { /* a body the guest wrote before next is Python's to place */
        PyObject *body = PyObject_GetAttr(self->state, s_response_body);
        if (body == NULL) return NULL;
        int written = truth(body);
        Py_DECREF(body);
        if (written < 0) return NULL;
        fast = !written;
    }
    if (!fast) return call_python(py_after_handle_request, (PyObject *)self, next);
    if (changed) {
        /* state.apply_changes(self._note_dropped): it leaves the state's features and response body as they are */
        PyObject *note_dropped = PyObject_GetAttr((PyObject *)self, s_note_dropped);
        if (note_dropped == NULL) return NULL;
        PyObject *done = PyObject_CallMethodOneArg(self->state, s_apply_changes, note_dropped);
        Py_DECREF(note_dropped);
        if (done == NULL) return NULL;
        Py_DECREF(done);
    }
    PyObject *name = PyObject_GetAttr(self->guest, s_name);
    if (name == NULL) return NULL;
    PyObject *sink_args[3] = {self->request, empty_bytes, name};
    PyObject *sink = PyObject_Vectorcall((PyObject *)fast_sink_type, sink_args, 3, NULL);
    Py_DECREF(name);
    if (sink == NULL) return NULL;
    Py_XSETREF(self->sink, sink);
    set_field(&self->stage, stage_downstream);
    PyObject *finish = NULL, *failed = NULL, *interception = NULL;
    if ((finish = PyObject_GetAttr((PyObject *)self, s_downstream_finish)) != NULL &&
        (failed = PyObject_GetAttr((PyObject *)self, s_downstream_failed)) != NULL) {
        PyObject *args[4] = {self->request, sink, finish, failed};
        interception = PyObject_Vectorcall((PyObject *)fast_interception_type, args, 4, NULL);
    }
    Py_XDECREF(finish);
    Py_XDECREF(failed);
    if (interception == NULL) return NULL;
    Py_XSETREF(self->interception, interception);
    return PyObject_CallMethodNoArgs((PyObject *)self, s_render_downstream);
}

static PyObject *Filter_downstream_finish(Filter *self, PyObject *unused) {
    if (not_ready()) return NULL;
    if (!filter_whole(self)) return call_python(py_downstream_finish, (PyObject *)self, NULL);
    if (self->stage != stage_downstream) Py_RETURN_NONE;
    int gone = truth(self->client_gone);
    if (gone != 0) {
        if (gone < 0) return NULL;
        Py_RETURN_NONE;
    }
    if (Py_TYPE(self->sink) != fast_sink_type) return call_python(py_downstream_finish, (PyObject *)self, NULL);
    Sink *sink = (Sink *)self->sink;
    int prefixed = truth(sink->prefix);
    if (prefixed != 0) return prefixed < 0 ? NULL : call_python(py_downstream_finish, (PyObject *)self, NULL);
    PyObject *code = PyObject_GetAttr(self->request, s_code);
    if (code == NULL) return NULL;
    Py_XSETREF(self->downstream_code, code);
    set_field(&sink->open, Py_False);
    set_field(&self->stage, stage_guest_response);
    PyObject *done = PyObject_CallMethodOneArg(self->state, s_enter_response_phase, code);
    if (done == NULL) return NULL;
    Py_DECREF(done);
    done = run_call(self, s_handle_response, s_after_handle_response, s_handle_response_failed, NULL);
    if (done == NULL) return NULL;
    Py_DECREF(done);
    Py_RETURN_NONE;
}

static PyObject *Filter_after_handle_response(Filter *self, PyObject *result) {
    if (not_ready()) return NULL;
    if (!filter_whole(self)) return call_python(py_after_handle_response, (PyObject *)self, result);
    int gone = truth(self->client_gone);
    if (gone < 0) return NULL;
    if (gone || self->then != Py_None || self->downstream_failure != Py_None || Py_TYPE(self->sink) != fast_sink_type)
        return call_python(py_after_handle_response, (PyObject *)self, result);
    set_field(&self->stage, stage_done);
    if (self->interception != Py_None) {
        PyObject *done = PyObject_CallMethodNoArgs(self->interception, s_remove);
        if (done == NULL) return NULL;
        Py_DECREF(done);
    }
    int report = self->observer != Py_None || self->detached_body != Py_None;
    if (!report) {
        report = truth(self->guest_body_reserved);
        if (report < 0) return NULL;
    }
    if (report) {
        PyObject *done = PyObject_CallMethodOneArg((PyObject *)self, s_report, passed);
        if (done == NULL) return NULL;
        Py_DECREF(done);
    }
    return PyObject_CallMethodNoArgs(self->sink, s_complete);
}

static PyMethodDef Filter_methods[] = {
    {"start", (PyCFunction)Filter_start, METH_NOARGS, "RequestFilter.start, in C."},
    {"_after_handle_request", (PyCFunction)Filter_after_handle_request, METH_O, "In C, for the common case."},
    {"_downstream_finish", (PyCFunction)Filter_downstream_finish, METH_NOARGS, "In C, for the common case."},
    {"_after_handle_response", (PyCFunction)Filter_after_handle_response, METH_O, "In C, for the common case."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Filter_members[] = {
    {"settings", T_OBJECT_EX, offsetof(Filter, settings), 0, NULL},
    {"guest", T_OBJECT_EX, offsetof(Filter, guest), 0, NULL},
    {"request", T_OBJECT_EX, offsetof(Filter, request), 0, NULL},
    {"state", T_OBJECT_EX, offsetof(Filter, state), 0, NULL},
    {"inline", T_OBJECT_EX, offsetof(Filter, inline_), 0, NULL},
    {"session", T_OBJECT_EX, offsetof(Filter, session), 0, NULL},
    {"stage", T_OBJECT_EX, offsetof(Filter, stage), 0, NULL},
    {"client_gone", T_OBJECT_EX, offsetof(Filter, client_gone), 0, NULL},
    {"sink", T_OBJECT_EX, offsetof(Filter, sink), 0, NULL},
    {"interception", T_OBJECT_EX, offsetof(Filter, interception), 0, NULL},
    {"downstream_failure", T_OBJECT_EX, offsetof(Filter, downstream_failure), 0, NULL},
    {"then", T_OBJECT_EX, offsetof(Filter, then), 0, NULL},
    {"_detached_body", T_OBJECT_EX, offsetof(Filter, detached_body), 0, NULL},
    {"_host_connection", T_OBJECT_EX, offsetof(Filter, host_connection), 0, NULL},
    {"_original_body", T_OBJECT_EX, offsetof(Filter, original_body), 0, NULL},
    {"_downstream_code", T_OBJECT_EX, offsetof(Filter, downstream_code), 0, NULL},
    {"_guest_body_reserved", T_OBJECT_EX, offsetof(Filter, guest_body_reserved), 0, NULL},
    {"_reported", T_OBJECT_EX, offsetof(Filter, reported), 0, NULL},
    {"observer", T_OBJECT_EX, offsetof(Filter, observer), 0, NULL},
    {"started", T_OBJECT_EX, offsetof(Filter, started), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FilterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twisted_httpwasm.web._fast.FilterCore",
    .tp_basicsize = sizeof(Filter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The storage and hot methods of filter.RequestFilter.",
    .tp_traverse = (traverseproc)Filter_traverse,
    .tp_clear = (inquiry)Filter_clear,
    .tp_dealloc = (destructor)Filter_dealloc,
    .tp_init = (initproc)Filter_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = Filter_methods,
    .tp_members = Filter_members,
};

/* ====================================================================================== */
/* setup                                                                                   */
/* ====================================================================================== */

static int take(PyObject *config, const char *key, PyObject **out) {
    PyObject *value = PyDict_GetItemString(config, key);
    if (value == NULL) {
        PyErr_Format(PyExc_KeyError, "setup(): %s missing", key);
        return -1;
    }
    Py_XSETREF(*out, Py_NewRef(value));
    return 0;
}

static int take_type(PyObject *config, const char *key, PyTypeObject *base, PyTypeObject **out) {
    PyObject *value = NULL;
    if (take(config, key, &value) < 0) return -1;
    if (!PyType_Check(value) || !PyType_IsSubtype((PyTypeObject *)value, base)) {
        Py_DECREF(value);
        PyErr_Format(PyExc_TypeError, "setup(): %s must be a subclass of %s", key, base->tp_name);
        return -1;
    }
    Py_XSETREF(*out, (PyTypeObject *)value);
    return 0;
}

static PyObject *setup(PyObject *module, PyObject *config) {
    if (!PyDict_Check(config)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes a dict");
        return NULL;
    }
    PyObject *stages = NULL, *request_bit = NULL, *response_bit = NULL;
    if (take(config, "state_type", &state_type) < 0 || take(config, "inline_runner", &inline_runner_type) < 0 ||
        take(config, "no_observer", &no_observer) < 0 || take(config, "not_read", &not_read) < 0 ||
        take(config, "monotonic", &monotonic) < 0 || take(config, "passed", &passed) < 0 ||
        take(config, "not_done_yet", &not_done_yet) < 0 || take(config, "stages", &stages) < 0 ||
        take(config, "buffer_request", &request_bit) < 0 || take(config, "buffer_response", &response_bit) < 0 ||
        take(config, "filter_init", &py_filter_init) < 0 || take(config, "start", &py_start) < 0 ||
        take(config, "after_handle_request", &py_after_handle_request) < 0 ||
        take(config, "downstream_finish", &py_downstream_finish) < 0 ||
        take(config, "after_handle_response", &py_after_handle_response) < 0 ||
        take_type(config, "sink_type", &SinkType, &fast_sink_type) < 0 ||
        take_type(config, "interception_type", &InterceptionType, &fast_interception_type) < 0 ||
        take(config, "sink_init", &py_sink_init) < 0 || take(config, "write", &py_write) < 0 ||
        take(config, "complete", &py_complete) < 0 || take(config, "no_body_codes", &no_body_codes) < 0 ||
        take(config, "encoder_attribute", &encoder_attribute) < 0 ||
        take(config, "raw_header_map", &raw_header_map) < 0 ||
        take(config, "content_length_name", &content_length_name) < 0 ||
        take(config, "context_attribute", &context_attribute) < 0 || take(config, "context_of", &context_of) < 0 ||
        take(config, "interception_init", &py_interception_init) < 0 || take(config, "remove", &py_remove) < 0 ||
        take(config, "all_methods", &all_methods) < 0 || take(config, "streamed_methods", &streamed_methods) < 0)
        goto fail;
    if (!PyTuple_Check(stages) || PyTuple_GET_SIZE(stages) != 4 || !PyTuple_Check(all_methods) ||
        !PyTuple_Check(streamed_methods) || !PyUnicode_Check(encoder_attribute) ||
        !PyUnicode_Check(context_attribute)) {
        PyErr_SetString(PyExc_TypeError, "setup(): stages, all_methods, streamed_methods must be tuples");
        goto fail;
    }
    Py_XSETREF(stage_guest_request, Py_NewRef(PyTuple_GET_ITEM(stages, 0)));
    Py_XSETREF(stage_downstream, Py_NewRef(PyTuple_GET_ITEM(stages, 1)));
    Py_XSETREF(stage_guest_response, Py_NewRef(PyTuple_GET_ITEM(stages, 2)));
    Py_XSETREF(stage_done, Py_NewRef(PyTuple_GET_ITEM(stages, 3)));
    buffer_request = PyLong_AsLong(request_bit);
    buffer_response = PyLong_AsLong(response_bit);
    if (PyErr_Occurred()) goto fail;
    Py_DECREF(stages);
    Py_DECREF(request_bit);
    Py_DECREF(response_bit);
    ready = 1;
    Py_RETURN_NONE;
fail:
    Py_XDECREF(stages);
    Py_XDECREF(request_bit);
    Py_XDECREF(response_bit);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"setup", (PyCFunction)setup, METH_O, "Give the fast path what it calls and compares with (see web/fast.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_fast", "The compiled fast path of the twisted.web side.",
                                        -1, module_methods};

#define INTERN(var, text)                                                                                              \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__fast(void) {
    INTERN(s_guest, "guest");
    INTERN(s_runner, "runner");
    INTERN(s_run, "run");
    INTERN(s_method, "method");
    INTERN(s_uri, "uri");
    INTERN(s_content, "content");
    INTERN(s_max_buffer_bytes, "max_buffer_bytes");
    INTERN(s_request, "request");
    INTERN(s_client_headers, "client_headers");
    INTERN(s_request_headers, "requestHeaders");
    INTERN(s_session, "session");
    INTERN(s_observer, "observer");
    INTERN(s_handle_request, "handle_request");
    INTERN(s_handle_response, "handle_response");
    INTERN(s_after_handle_request, "_after_handle_request");
    INTERN(s_handle_request_failed, "_handle_request_failed");
    INTERN(s_after_handle_response, "_after_handle_response");
    INTERN(s_handle_response_failed, "_handle_response_failed");
    INTERN(s_downstream_finish, "_downstream_finish");
    INTERN(s_downstream_failed, "_downstream_failed");
    INTERN(s_features, "features");
    INTERN(s_touched, "touched");
    INTERN(s_name, "name");
    INTERN(s_enter_response_phase, "enter_response_phase");
    INTERN(s_render_downstream, "_render_downstream");
    INTERN(s_report, "_report");
    INTERN(s_code, "code");
    INTERN(s_started_writing, "startedWriting");
    INTERN(s_response_headers, "responseHeaders");
    INTERN(s_remove_header, "removeHeader");
    INTERN(s_finish, "finish");
    INTERN(s_write, "write");
    INTERN(s_processing_failed, "processingFailed");
    INTERN(s_register_producer, "registerProducer");
    INTERN(s_unregister_producer, "unregisterProducer");
    INTERN(s_register_producer_sink, "register_producer");
    INTERN(s_unregister_producer_sink, "unregister_producer");
    INTERN(s_buffered, "buffered");
    INTERN(s_interception, "interception");
    INTERN(s_log_length_mismatch, "_log_length_mismatch");
    INTERN(s_get, "get");
    INTERN(s_may_read_request_body, "may_read_request_body");
    INTERN(s_watch_client, "_watch_client");
    INTERN(s_client_there, "_client_there");
    INTERN(s_response_body, "response_body");
    INTERN(s_note_dropped, "_note_dropped");
    INTERN(s_apply_changes, "apply_changes");
    INTERN(s_forward, "forward");
    INTERN(s_remove, "remove");
    INTERN(s_complete, "complete");
    INTERN(s_wrote_more, "wrote more than");
    INTERN(s_excess_not_sent, "the excess is not sent");
    if ((s_head = PyBytes_FromString("HEAD")) == NULL) return NULL;
    if ((content_length_header = PyBytes_FromString("content-length")) == NULL) return NULL;
    if ((empty_bytes = PyBytes_FromStringAndSize("", 0)) == NULL) return NULL;
    if ((zero = PyLong_FromLong(0)) == NULL || (int_100 = PyLong_FromLong(100)) == NULL ||
        (int_200 = PyLong_FromLong(200)) == NULL || (int_204 = PyLong_FromLong(204)) == NULL)
        return NULL;
    if ((float_zero = PyFloat_FromDouble(0.0)) == NULL) return NULL;
    if ((kw_inline = Py_BuildValue("(s)", "inline")) == NULL) return NULL;
    if (PyType_Ready(&SinkType) < 0 || PyType_Ready(&InterceptionType) < 0 || PyType_Ready(&FilterType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "StreamedSinkCore", (PyObject *)&SinkType) < 0 ||
        PyModule_AddObjectRef(module, "InterceptionCore", (PyObject *)&InterceptionType) < 0 ||
        PyModule_AddObjectRef(module, "FilterCore", (PyObject *)&FilterType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
