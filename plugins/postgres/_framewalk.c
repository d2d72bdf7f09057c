/* Stepping over Postgres wire frames in C: the one loop of the relay that runs
 * per frame. framewalk.py holds the same function in Python (the fallback
 * where this module is not built, and the oracle the tests compare it with);
 * its docstring is the contract. Knows nothing but the frame header:
 * "a type byte, then an Int32 length that counts itself but not the type". */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *FrameError;

static PyObject *
walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, table;
    Py_ssize_t pos;
    PyObject *hits = NULL, *result = NULL;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "walk(data, pos, table)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &table, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (table.len != 256) {
        PyErr_SetString(PyExc_ValueError, "table must be 256 bytes");
        goto done;
    }
    hits = PyList_New(0);
    if (hits == NULL)
        goto done;
    {
        const unsigned char *p = (const unsigned char *)data.buf;
        const unsigned char *act = (const unsigned char *)table.buf;
        Py_ssize_t n = data.len;
        while (pos >= 0 && n - pos >= 5) {
            unsigned char kind = p[pos];
            int32_t length = (int32_t)(((uint32_t)p[pos + 1] << 24) | ((uint32_t)p[pos + 2] << 16)
                                       | ((uint32_t)p[pos + 3] << 8) | (uint32_t)p[pos + 4]);
            Py_ssize_t begin = pos;
            if (length < 4) {
                PyObject *exc_args = Py_BuildValue("(nii)", begin, (int)kind, (int)length);
                if (exc_args != NULL) {
                    PyErr_SetObject(FrameError, exc_args);
                    Py_DECREF(exc_args);
                }
                Py_CLEAR(hits);
                goto done;
            }
            pos += 1 + (Py_ssize_t)length;
            if (act[kind]) {
                PyObject *hit = Py_BuildValue("(inn)", (int)kind, begin, pos);
                if (hit == NULL || PyList_Append(hits, hit) < 0) {
                    Py_XDECREF(hit);
                    Py_CLEAR(hits);
                    goto done;
                }
                Py_DECREF(hit);
            }
        }
    }
    result = Py_BuildValue("(nN)", pos, hits);
    hits = NULL;
done:
    Py_XDECREF(hits);
    PyBuffer_Release(&data);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(data, pos, table) -> (next, hits); see gateway_postgres.framewalk."},
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
