/* Stepping over Postgres wire frames in C: the one loop of the relay that runs
 * per frame. framewalk.py holds the same function in Python (the fallback
 * where this module is not built, and the oracle the tests compare it with);
 * its docstring is the contract. Knows nothing but the frame header:
 * "a type byte, then an Int32 length that counts itself but not the type". */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_frames.h"

static PyObject *FrameError;

static void
frame_error(Py_ssize_t begin, unsigned char kind, int32_t length)
{
    PyObject *exc_args = Py_BuildValue("(nii)", begin, (int)kind, (int)length);
    if (exc_args != NULL) {
        PyErr_SetObject(FrameError, exc_args);
        Py_DECREF(exc_args);
    }
}

/* A tuple of n integers, built directly: Py_BuildValue parses its format
 * string on every call, and walk builds one per reported frame. */
static inline PyObject *
ints(Py_ssize_t n, const Py_ssize_t *values)
{
    PyObject *t = PyTuple_New(n), *x;
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((x = PyLong_FromSsize_t(values[i])) == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

static PyObject *
pair(Py_ssize_t a, PyObject *b)  /* steals b */
{
    PyObject *t, *x;
    if (b == NULL)
        return NULL;
    t = PyTuple_New(2);
    x = PyLong_FromSsize_t(a);
    if (t == NULL || x == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(x);
        Py_DECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, x);
    PyTuple_SET_ITEM(t, 1, b);
    return t;
}

/* The arguments of walk and tally: (data, pos, table). On success both
 * buffers are held, and the caller releases them. */
static inline int
table_args(PyObject *const *args, Py_ssize_t nargs, const char *usage,
           Py_buffer *data, Py_ssize_t *pos, Py_buffer *table)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    *pos = PyLong_AsSsize_t(args[1]);
    if (*pos == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[0], data, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(args[2], table, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(data);
        return -1;
    }
    if (table->len != 256) {
        PyErr_SetString(PyExc_ValueError, "table must be 256 bytes");
        PyBuffer_Release(data);
        PyBuffer_Release(table);
        return -1;
    }
    return 0;
}

static PyObject *
walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, table;
    Py_ssize_t pos;
    PyObject *hits = NULL, *result = NULL;

    if (table_args(args, nargs, "walk(data, pos, table)", &data, &pos, &table) < 0)
        return NULL;
    hits = PyList_New(0);
    if (hits == NULL)
        goto done;
    {
        const unsigned char *p = (const unsigned char *)data.buf;
        const unsigned char *act = (const unsigned char *)table.buf;
        Py_ssize_t n = data.len;
        while (pos >= 0 && n - pos >= 5) {
            unsigned char kind = p[pos];
            int32_t length = frame_length(p + pos + 1);
            Py_ssize_t begin = pos;
            if (length < 4) {
                frame_error(begin, kind, length);
                Py_CLEAR(hits);
                goto done;
            }
            pos += 1 + (Py_ssize_t)length;
            if (act[kind]) {
                PyObject *hit = ints(3, (Py_ssize_t[]){kind, begin, pos});
                if (hit == NULL || PyList_Append(hits, hit) < 0) {
                    Py_XDECREF(hit);
                    Py_CLEAR(hits);
                    goto done;
                }
                Py_DECREF(hit);
            }
        }
    }
    result = pair(pos, hits);
    hits = NULL;
done:
    Py_XDECREF(hits);
    PyBuffer_Release(&data);
    PyBuffer_Release(&table);
    return result;
}

static PyObject *
count(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    Py_ssize_t pos, n, found = 0;
    long want;
    const unsigned char *p;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "count(data, pos, kind)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    want = PyLong_AsLong(args[2]);
    if (want == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const unsigned char *)data.buf;
    n = data.len;
    while (pos >= 0 && n - pos >= 5) {
        unsigned char kind = p[pos];
        int32_t length = frame_length(p + pos + 1);
        if (length < 4) {
            frame_error(pos, kind, length);
            PyBuffer_Release(&data);
            return NULL;
        }
        pos += 1 + (Py_ssize_t)length;
        found += (kind == want);
    }
    PyBuffer_Release(&data);
    return pair(pos, PyLong_FromSsize_t(found));
}

static PyObject *
tally(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, table;
    Py_ssize_t pos, found = 0, last = -1;
    long flags = 0;
    PyObject *result = NULL;

    if (table_args(args, nargs, "tally(data, pos, table)", &data, &pos, &table) < 0)
        return NULL;
    {
        const unsigned char *p = (const unsigned char *)data.buf;
        int32_t length;
        if (tally_frames(p, data.len, &pos, (const unsigned char *)table.buf, &found, &flags,
                         &last, &length) < 0) {
            frame_error(pos, p[pos], length);
            goto done;
        }
    }
    result = ints(4, (Py_ssize_t[]){pos, found, flags, last});
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(data, pos, table) -> (next, hits); see gateway_postgres.framewalk."},
    {"count", (PyCFunction)(void (*)(void))count, METH_FASTCALL,
     "count(data, pos, kind) -> (next, found); see gateway_postgres.framewalk."},
    {"tally", (PyCFunction)(void (*)(void))tally, METH_FASTCALL,
     "tally(data, pos, table) -> (next, found, flags, last); see gateway_postgres.framewalk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_framewalk", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__framewalk(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    FrameError = PyErr_NewException("gateway_postgres._framewalk.FrameError", PyExc_ValueError, NULL);
    if (FrameError == NULL || PyModule_AddObject(m, "FrameError", FrameError) < 0) {
        Py_XDECREF(FrameError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(FrameError);
    return m;
}
