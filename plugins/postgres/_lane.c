/* The Postgres relay's per-chunk work, in C, for the two states a session
 * spends most of its life in where no unit is cut:
 *
 *   plain: unmirrored (no mirror, none sampled): forward the chunk, count the
 *          primary's ReadyForQuery frames and time them;
 *   dark:  every mirror refuses units (a hung or down mirror): forward the
 *          chunk, count its Sync-ended request cycles as drops, time and
 *          settle them with the primary's ReadyForQuery frames.
 *
 * The session's Python code (relay.py: PgSession.data_received, primary_data
 * and the methods they call) is the definition of what happens to a chunk,
 * and where this module is not built, the only code. A Lane does exactly
 * what that code does for the chunks it accepts, and hands every other chunk
 * back, after it has been forwarded and before anything was counted: it then
 * stops, gives the session its state, and the session reads the chunk as if
 * the Lane had never run. tests/unit/test_pg_lane.py drives sessions with
 * and without a Lane through the same traffic and compares everything they
 * count.
 *
 * While on, a Lane may also own the session's two sockets (own, Poller
 * below): it reads them itself from the event loop's epoll set and writes
 * them directly, and the event loop's transports stop reading until it gives
 * them back (disown: end of file, an error, a chunk handed back, the
 * session's end).
 *
 * Why C: the Python of these two states cost about 1 µs of CPU per pgbench
 * transaction, about a tenth of the gateway's throughput against pgbouncer on
 * the benchmark machine (docs/performance.md); a call into a C method per
 * chunk costs no Python frame. Reading the sockets itself saves the
 * transports' callbacks too: on the slower machine of 2026-12-05 the relay
 * then spent 8-11 µs of CPU per transaction less than the bare uvloop pump
 * (which the gateway had matched), about what pgbouncer spends. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_frames.h"

enum { OFF = 0, PLAIN = 1, DARK = 2 };
/* The side of a chunk handed back; UNWRITTEN: not forwarded yet (the session
 * reads it from the start). */
enum { FRONT = 0, BACK = 1, UNWRITTEN = 2 };

static PyObject *s_primary_units, *s_sum, *s_offered, *s_dropped, *s_skipped,
    *s_count, *s_generation;
static PyObject *time_monotonic;  /* read directly when it is the clock */

typedef struct {
    PyObject_HEAD
    int mode;
    /* The session's Python methods: the whole of each side (while OFF), and
     * the hand-back: handoff(side, chunk, state). */
    PyObject *front_py, *back_py, *handoff;
    /* While on. */
    PyObject *primary_write, *client_write;
    PyObject *stats;     /* ListenerStats: primary_units */
    PyObject *hist;      /* its primary_latency Histogram: bounds, counts, sum */
    PyObject *bounds;    /* tuple of floats */
    PyObject *counts;    /* list of ints, one more than bounds */
    PyObject *clock;     /* relay._clock */
    int monotonic;       /* it is time.monotonic: clock_gettime, no call */
    Py_ssize_t skip;     /* primary bytes of the current frame still to come */
    PyObject *tail;      /* a split frame header (bytes), or NULL */
    /* plain */
    double waiting_since;
    int answered;
    /* dark */
    int idle, counted;
    double down;
    Py_ssize_t min_unit;
    PyObject *drops;     /* list of (MirrorStats, its dropped dict, DropReason) */
    PyObject *skipped;   /* list of MirrorStats */
    PyObject *changes;   /* the queue-change counter: .count */
    PyObject *asked;     /* its count when the mirrors were last asked */
    PyObject *ctx;       /* ListenerContext: .generation */
    PyObject *generation;
    double *times;       /* send times of pending units: a ring */
    Py_ssize_t head, npending, cap;
    /* Owned sockets (see Poller): while poller is set, the session's two
     * sockets are read and written here, [FRONT] the client's and [BACK]
     * the primary's, and the event loop's transports do not read them. */
    PyObject *poller;
    PyObject *disowned;  /* the session's disowned(exc, to_primary, to_client) */
    int fd[2];
    struct End { void *lane; int side; } ends[2];
    PyObject *out[2];    /* bytes still to write to that end, from out_off */
    Py_ssize_t out_off[2];
    uint32_t events[2];  /* what each end is registered for */
    int broken;          /* a write failed: give the sockets back */
} Lane;

typedef struct {
    PyObject_HEAD
    int epfd;
} Poller;

static PyTypeObject PollerType;
static int disown(Lane *self, PyObject *exc);

/* Frame types: on the client side Sync counts a request cycle, and Query,
 * FunctionCall, Parse, Close and the COPY frames need the session's full
 * scan; on the primary side ReadyForQuery counts an answer. */
static unsigned char front_marks[256], back_marks[256];

static void
release_refs(Lane *self)
{
    self->mode = OFF;
    Py_CLEAR(self->primary_write);
    Py_CLEAR(self->client_write);
    Py_CLEAR(self->stats);
    Py_CLEAR(self->hist);
    Py_CLEAR(self->bounds);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->tail);
    Py_CLEAR(self->drops);
    Py_CLEAR(self->skipped);
    Py_CLEAR(self->changes);
    Py_CLEAR(self->asked);
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->generation);
    self->head = self->npending = 0;
}

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->front_py);
    Py_VISIT(self->back_py);
    Py_VISIT(self->handoff);
    Py_VISIT(self->primary_write);
    Py_VISIT(self->client_write);
    Py_VISIT(self->stats);
    Py_VISIT(self->hist);
    Py_VISIT(self->clock);
    Py_VISIT(self->drops);
    Py_VISIT(self->skipped);
    Py_VISIT(self->changes);
    Py_VISIT(self->ctx);
    Py_VISIT(self->disowned);
    return 0;
}

/* Take both sockets out of the poller's epoll set. */
static void
unregister(Lane *self)
{
    int epfd = ((Poller *)self->poller)->epfd;
    epoll_ctl(epfd, EPOLL_CTL_DEL, self->fd[FRONT], NULL);
    epoll_ctl(epfd, EPOLL_CTL_DEL, self->fd[BACK], NULL);
}

/* Forget the sockets without calling the session (the Lane is being
 * cleared: nothing is left to give them back to). */
static void
drop_sockets(Lane *self)
{
    int owned = self->poller != NULL;
    if (owned)
        unregister(self);
    Py_CLEAR(self->poller);
    Py_CLEAR(self->disowned);
    Py_CLEAR(self->out[FRONT]);
    Py_CLEAR(self->out[BACK]);
    if (owned)
        Py_DECREF(self);  /* the registration's reference (own) */
}

static int
lane_clear(Lane *self)
{
    drop_sockets(self);
    release_refs(self);
    Py_CLEAR(self->front_py);
    Py_CLEAR(self->back_py);
    Py_CLEAR(self->handoff);
    return 0;
}

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    PyMem_Free(self->times);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    PyObject *front, *back, *handoff;
    if (!PyArg_ParseTuple(args, "OOO:Lane", &front, &back, &handoff))
        return -1;
    lane_clear(self);
    self->front_py = Py_NewRef(front);
    self->back_py = Py_NewRef(back);
    self->handoff = Py_NewRef(handoff);
    return 0;
}

/* ------------------------------------------------------------------ state */

/* (mode, skip, tail, waiting_since, answered, idle, pending times, counted):
 * what the session takes back. */
static PyObject *
state(Lane *self)
{
    PyObject *times = PyTuple_New(self->npending), *tail, *result;
    if (times == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->npending; i++) {
        PyObject *t = PyFloat_FromDouble(self->times[(self->head + i) % self->cap]);
        if (t == NULL) {
            Py_DECREF(times);
            return NULL;
        }
        PyTuple_SET_ITEM(times, i, t);
    }
    tail = self->tail != NULL ? self->tail : Py_None;
    result = Py_BuildValue("(inOdiiNi)", self->mode, self->skip, tail, self->waiting_since,
                           self->answered, self->idle, times, self->counted);
    return result;
}

static PyObject *
lane_state(Lane *self, PyObject *unused)
{
    if (self->mode == OFF)
        Py_RETURN_NONE;
    return state(self);
}

static PyObject *
lane_release(Lane *self, PyObject *unused)
{
    PyObject *result;
    if (self->mode == OFF)
        Py_RETURN_NONE;
    if (disown(self, NULL) < 0)
        return NULL;
    result = state(self);
    release_refs(self);
    return result;
}

/* Give the chunk back: the session takes the state and reads the chunk. */
static PyObject *
hand_back(Lane *self, int side, PyObject *data)
{
    PyObject *st = state(self), *result, *side_obj;
    if (st == NULL)
        return NULL;
    if (disown(self, NULL) < 0) {
        Py_DECREF(st);
        return NULL;
    }
    release_refs(self);
    side_obj = PyLong_FromLong(side);
    if (side_obj == NULL) {
        Py_DECREF(st);
        return NULL;
    }
    result = PyObject_CallFunctionObjArgs(self->handoff, side_obj, data, st, NULL);
    Py_DECREF(side_obj);
    Py_DECREF(st);
    return result;
}

static int
common_args(Lane *self, PyObject *primary_write, PyObject *client_write, PyObject *stats,
            PyObject *clock, Py_ssize_t skip, PyObject *tail)
{
    PyObject *hist, *bounds, *counts;
    if (self->poller != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the lane still owns the sockets");
        return -1;
    }
    if ((hist = PyObject_GetAttrString(stats, "primary_latency")) == NULL)
        return -1;
    bounds = PyObject_GetAttrString(hist, "bounds");
    counts = PyObject_GetAttrString(hist, "counts");
    if (bounds == NULL || counts == NULL || !PyTuple_Check(bounds) || !PyList_Check(counts)
            || PyList_GET_SIZE(counts) != PyTuple_GET_SIZE(bounds) + 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a Histogram with a bounds tuple and a counts list");
        Py_DECREF(hist);
        Py_XDECREF(bounds);
        Py_XDECREF(counts);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(bounds); i++) {
        if (!PyFloat_Check(PyTuple_GET_ITEM(bounds, i))) {
            PyErr_SetString(PyExc_TypeError, "histogram bounds must be floats");
            Py_DECREF(hist);
            Py_DECREF(bounds);
            Py_DECREF(counts);
            return -1;
        }
    }
    release_refs(self);
    self->primary_write = Py_NewRef(primary_write);
    self->client_write = Py_NewRef(client_write);
    self->stats = Py_NewRef(stats);
    self->hist = hist;
    self->bounds = bounds;
    self->counts = counts;
    self->clock = Py_NewRef(clock);
    self->monotonic = clock == time_monotonic;
    self->skip = skip;
    if (tail != Py_None && PyBytes_GET_SIZE(tail) > 0)
        self->tail = Py_NewRef(tail);
    self->waiting_since = 0.0;
    self->answered = 1;
    self->idle = 1;
    self->counted = 0;
    return 0;
}

/* plain(primary_write, client_write, stats, clock, skip, tail, waiting_since, answered) */
static PyObject *
lane_plain(Lane *self, PyObject *args)
{
    PyObject *pw, *cw, *stats, *clock, *tail;
    Py_ssize_t skip;
    double since;
    int answered;
    if (!PyArg_ParseTuple(args, "OOOOnSdp:plain", &pw, &cw, &stats, &clock, &skip, &tail,
                          &since, &answered))
        return NULL;
    if (common_args(self, pw, cw, stats, clock, skip, tail) < 0)
        return NULL;
    self->waiting_since = since;
    self->answered = answered;
    self->mode = PLAIN;
    Py_RETURN_NONE;
}

/* dark(primary_write, client_write, stats, clock, skip, idle, down, min_unit,
 *      drops, skipped, changes, asked, ctx, generation) */
static PyObject *
lane_dark(Lane *self, PyObject *args)
{
    PyObject *pw, *cw, *stats, *clock, *drops, *skipped, *changes, *asked, *ctx, *generation;
    PyObject *kept;
    Py_ssize_t skip, min_unit;
    int idle;
    double down;
    if (!PyArg_ParseTuple(args, "OOOOnpdnO!O!OOOO:dark", &pw, &cw, &stats, &clock, &skip, &idle,
                          &down, &min_unit, &PyList_Type, &drops, &PyList_Type, &skipped,
                          &changes, &asked, &ctx, &generation))
        return NULL;
    /* Each mirror's dropped dict is read once here, not once per chunk. */
    if ((kept = PyList_New(PyList_GET_SIZE(drops))) == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(drops); i++) {
        PyObject *d = PyList_GET_ITEM(drops, i), *dropped, *triple;
        if (!PyTuple_Check(d) || PyTuple_GET_SIZE(d) != 2) {
            PyErr_SetString(PyExc_TypeError, "drops must be (stats, reason) pairs");
            Py_DECREF(kept);
            return NULL;
        }
        dropped = PyObject_GetAttr(PyTuple_GET_ITEM(d, 0), s_dropped);
        triple = dropped != NULL ? PyTuple_Pack(3, PyTuple_GET_ITEM(d, 0), dropped,
                                                PyTuple_GET_ITEM(d, 1)) : NULL;
        Py_XDECREF(dropped);
        if (triple == NULL) {
            Py_DECREF(kept);
            return NULL;
        }
        PyList_SET_ITEM(kept, i, triple);
    }
    if (common_args(self, pw, cw, stats, clock, skip, Py_None) < 0) {
        Py_DECREF(kept);
        return NULL;
    }
    self->idle = idle;
    self->down = down;
    self->min_unit = min_unit;
    self->drops = kept;
    self->skipped = Py_NewRef(skipped);
    self->changes = Py_NewRef(changes);
    self->asked = Py_NewRef(asked);
    self->ctx = Py_NewRef(ctx);
    self->generation = Py_NewRef(generation);
    self->mode = DARK;
    Py_RETURN_NONE;
}

/* --------------------------------------------------------------- counting */

static int
now(Lane *self, double *t)
{
    PyObject *r;
    if (self->monotonic) {
        /* What time.monotonic() reads on Linux, converted as it converts. */
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
            *t = (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9;
            return 0;
        }
    }
    r = PyObject_CallNoArgs(self->clock);
    if (r == NULL)
        return -1;
    *t = PyFloat_AsDouble(r);
    Py_DECREF(r);
    return (*t == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* obj.name += n */
static int
add_attr(PyObject *obj, PyObject *name, Py_ssize_t n)
{
    PyObject *v = PyObject_GetAttr(obj, name), *by, *sum;
    int rc;
    if (v == NULL)
        return -1;
    by = PyLong_FromSsize_t(n);
    sum = by != NULL ? PyNumber_Add(v, by) : NULL;
    Py_DECREF(v);
    Py_XDECREF(by);
    if (sum == NULL)
        return -1;
    rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* Histogram.observe(value, times): the bucket of bisect_left(bounds, value). */
static int
observe(Lane *self, double value, Py_ssize_t times)
{
    Py_ssize_t i = 0, nb = PyTuple_GET_SIZE(self->bounds);
    PyObject *old, *by, *new, *total, *add;
    double sum;
    while (i < nb && PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(self->bounds, i)) < value)
        i++;
    old = PyList_GET_ITEM(self->counts, i);
    by = PyLong_FromSsize_t(times);
    if (by == NULL)
        return -1;
    new = PyNumber_Add(old, by);
    Py_DECREF(by);
    if (new == NULL)
        return -1;
    PyList_SET_ITEM(self->counts, i, new);
    Py_DECREF(old);
    total = PyObject_GetAttr(self->hist, s_sum);
    if (total == NULL)
        return -1;
    sum = PyFloat_AsDouble(total);
    Py_DECREF(total);
    if (sum == -1.0 && PyErr_Occurred())
        return -1;
    add = PyFloat_FromDouble(sum + value * (double)times);
    if (add == NULL)
        return -1;
    if (PyObject_SetAttr(self->hist, s_sum, add) < 0) {
        Py_DECREF(add);
        return -1;
    }
    Py_DECREF(add);
    return 0;
}

static int
push_times(Lane *self, double t, Py_ssize_t n)
{
    if (self->npending + n > self->cap) {
        Py_ssize_t cap = self->cap ? self->cap : 8, i;
        double *grown;
        while (cap < self->npending + n)
            cap *= 2;
        grown = PyMem_New(double, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (i = 0; i < self->npending; i++)
            grown[i] = self->times[(self->head + i) % self->cap];
        PyMem_Free(self->times);
        self->times = grown;
        self->cap = cap;
        self->head = 0;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        self->times[(self->head + self->npending + i) % self->cap] = t;
    self->npending += n;
    return 0;
}

/* Is the session at the start of a transaction where the mirrors must be
 * asked again (the time has come, a queue changed, a reload)? */
static int
must_ask(Lane *self, double t)
{
    PyObject *v;
    int same;
    if (t >= self->down)
        return 1;
    if ((v = PyObject_GetAttr(self->changes, s_count)) == NULL)
        return -1;
    same = PyObject_RichCompareBool(v, self->asked, Py_EQ);
    Py_DECREF(v);
    if (same <= 0)
        return same < 0 ? -1 : 1;
    if ((v = PyObject_GetAttr(self->ctx, s_generation)) == NULL)
        return -1;
    same = PyObject_RichCompareBool(v, self->generation, Py_EQ);
    Py_DECREF(v);
    return same < 0 ? -1 : !same;
}

/* The drops an offer of each of ``units`` units would count: under each
 * mirror's reason, and as skipped for the mirrors sampling left out. */
static int
count_drops(Lane *self, Py_ssize_t units)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->drops); i++) {
        PyObject *triple = PyList_GET_ITEM(self->drops, i);
        PyObject *stats = PyTuple_GET_ITEM(triple, 0), *dropped = PyTuple_GET_ITEM(triple, 1);
        PyObject *reason = PyTuple_GET_ITEM(triple, 2), *v, *by, *sum;
        int rc;
        if (add_attr(stats, s_offered, units) < 0)
            return -1;
        v = PyObject_GetItem(dropped, reason);
        by = v != NULL ? PyLong_FromSsize_t(units) : NULL;
        sum = by != NULL ? PyNumber_Add(v, by) : NULL;
        Py_XDECREF(v);
        Py_XDECREF(by);
        rc = sum != NULL ? PyObject_SetItem(dropped, reason, sum) : -1;
        Py_XDECREF(sum);
        if (rc < 0)
            return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->skipped); i++) {
        if (add_attr(PyList_GET_ITEM(self->skipped, i), s_skipped, units) < 0)
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ sides */

/* A dark session's client chunk: whole request cycles ending at Syncs, none
 * too large for a mirror, no frame that needs the full scan, and (at the
 * start of a transaction) nothing that makes the session ask again.
 * 1: counted; 0: hand it back; -1: error. */
static int
dark_front(Lane *self, PyObject *data)
{
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, units = 0, last = -1;
    long marks = 0;
    int32_t length;
    int ask;
    double t;
    if (n > self->min_unit)
        return 0;
    if (tally_frames(p, n, &pos, front_marks, &units, &marks, &last, &length) < 0)
        return 0;
    if (marks != 1 || last != n)
        return 0;
    if (now(self, &t) < 0)
        return -1;
    if (self->idle && self->npending == 0) {
        if ((ask = must_ask(self, t)) != 0)
            return ask < 0 ? -1 : 0;
    }
    if (count_drops(self, units) < 0 || push_times(self, t, units) < 0)
        return -1;
    self->counted = 1;
    return 1;
}

/* Step over the primary's frames from *pos: how many ReadyForQuery frames,
 * where the last one ends, where the walk stopped. 0, or -1 for a length
 * word below 4 (the session's scan reports it). */
static inline int
ready_frames(const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos,
             Py_ssize_t *ready, Py_ssize_t *last)
{
    long marks = 0;
    int32_t length;
    *ready = 0;
    *last = -1;
    return tally_frames(p, n, pos, back_marks, ready, &marks, last, &length);
}

/* Where the walk stopped: a split header kept, or bytes still to come. */
static int
advance(Lane *self, PyObject *data, Py_ssize_t pos)
{
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_CLEAR(self->tail);
    if (pos < n) {
        self->tail = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + pos, n - pos);
        self->skip = 0;
        return self->tail == NULL ? -1 : 0;
    }
    self->skip = pos - n;
    return 0;
}

/* A dark session's primary chunk: settle pending units, one per
 * ReadyForQuery; the last one's status says whether the session is idle.
 * 1: counted; 0: hand it back; -1: error. */
static int
dark_back(Lane *self, PyObject *data)
{
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), pos = self->skip, ready, last;
    double t;
    if (self->tail != NULL)
        return 0;
    if (pos >= n) {
        self->skip = pos - n;
        return 1;
    }
    if (ready_frames(p, n, &pos, &ready, &last) < 0)
        return 0;
    if (ready && (last > n || ready > self->npending))
        return 0;  /* a status byte still to come, or an answer to nothing */
    if (advance(self, data, pos) < 0)
        return -1;
    if (ready) {
        if (add_attr(self->stats, s_primary_units, ready) < 0 || now(self, &t) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < ready; i++) {
            double sent = self->times[self->head];
            self->head = (self->head + 1) % self->cap;
            self->npending--;
            if (observe(self, t - sent, 1) < 0)
                return -1;
        }
        self->idle = p[last - 1] == 'I';
    }
    return 1;
}

/* An unmirrored session's primary chunk: count its ReadyForQuery frames;
 * their latency runs from the first client chunk after the last answer.
 * 1: counted; 0: hand it back; -1: error. */
static int
plain_back(Lane *self, PyObject *data)
{
    PyObject *joined = NULL;
    const unsigned char *p;
    Py_ssize_t n, pos = self->skip, ready, last;
    int rc = 1;
    if (self->tail != NULL) {
        joined = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(self->tail) + PyBytes_GET_SIZE(data));
        if (joined == NULL)
            return -1;
        memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(self->tail), PyBytes_GET_SIZE(self->tail));
        memcpy(PyBytes_AS_STRING(joined) + PyBytes_GET_SIZE(self->tail), PyBytes_AS_STRING(data),
               PyBytes_GET_SIZE(data));
        data = joined;
    }
    p = (const unsigned char *)PyBytes_AS_STRING(data);
    n = PyBytes_GET_SIZE(data);
    if (pos >= n) {
        Py_CLEAR(self->tail);
        self->skip = pos - n;
        goto done;
    }
    if (ready_frames(p, n, &pos, &ready, &last) < 0) {
        rc = 0;  /* the tail stays: the session joins it again */
        goto done;
    }
    if (advance(self, data, pos) < 0) {
        rc = -1;
        goto done;
    }
    if (ready) {
        if (add_attr(self->stats, s_primary_units, ready) < 0) {
            rc = -1;
            goto done;
        }
        if (self->waiting_since != 0.0) {
            double t;
            if (now(self, &t) < 0 || observe(self, t - self->waiting_since, ready) < 0) {
                rc = -1;
                goto done;
            }
        }
        self->answered = 1;
    }
done:
    Py_XDECREF(joined);
    return rc;
}

static int
write_to(PyObject *write, PyObject *data)
{
    PyObject *r = PyObject_CallOneArg(write, data);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* ---------------------------------------------------------- owned sockets */

/* Register each end for what it can take now: reading while what it sends
 * has somewhere to go (nothing is waiting to be written to the other end),
 * writing while something is waiting for it. One chunk per direction is the
 * most held, as in the transports' flow control. */
static int
update_events(Lane *self)
{
    int epfd = ((Poller *)self->poller)->epfd;
    for (int end = FRONT; end <= BACK; end++) {
        uint32_t want = (self->out[1 - end] == NULL ? EPOLLIN : 0)
                        | (self->out[end] != NULL ? EPOLLOUT : 0);
        struct epoll_event ev = {.events = want, .data.ptr = &self->ends[end]};
        if (want == self->events[end])
            continue;
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, self->fd[end], &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        self->events[end] = want;
    }
    return 0;
}

/* Write what is waiting for ``end``; what the socket does not take now
 * waits for EPOLLOUT. A failed write leaves the rest to the transport,
 * which meets the same error and ends the connection. */
static int
flush(Lane *self, int end)
{
    PyObject *data = self->out[end];
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), done = self->out_off[end];
    while (done < n) {
        ssize_t w = send(self->fd[end], p + done, (size_t)(n - done), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0)
            done += w;
        else if (w < 0 && errno == EINTR)
            continue;
        else {
            if (w == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
                self->broken = 1;
            break;
        }
    }
    self->out_off[end] = done;
    if (done == n)
        Py_CLEAR(self->out[end]);
    return self->broken ? 0 : update_events(self);
}

/* Forward a chunk read from ``side`` to the other end. */
static int
forward(Lane *self, int side, PyObject *data)
{
    int end = 1 - side;
    if (self->poller == NULL)
        return write_to(end == BACK ? self->primary_write : self->client_write, data);
    if (self->out[end] != NULL) {
        /* Not read while the other end is behind; joined should it happen. */
        PyObject *old = self->out[end];
        Py_ssize_t off = self->out_off[end], left = PyBytes_GET_SIZE(old) - off;
        PyObject *joined = PyBytes_FromStringAndSize(NULL, left + PyBytes_GET_SIZE(data));
        if (joined == NULL)
            return -1;
        memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(old) + off, left);
        memcpy(PyBytes_AS_STRING(joined) + left, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
        Py_DECREF(old);
        self->out[end] = joined;
    } else {
        self->out[end] = Py_NewRef(data);
    }
    self->out_off[end] = 0;
    return flush(self, end);
}

/* Give the sockets back to the transports: the session's disowned(exc,
 * to_primary, to_client) resumes their reading and writes what was still
 * waiting here (and, given an exception, ends the session). */
static int
disown(Lane *self, PyObject *exc)
{
    PyObject *poller = self->poller, *callback = self->disowned, *to[2] = {NULL, NULL}, *r;
    int failed = 0;
    if (poller == NULL)
        return 0;
    unregister(self);
    self->poller = NULL;
    self->disowned = NULL;
    self->broken = 0;
    for (int end = FRONT; end <= BACK; end++) {
        PyObject *data = self->out[end];
        if (data == NULL)
            continue;
        to[end] = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + self->out_off[end],
                                            PyBytes_GET_SIZE(data) - self->out_off[end]);
        failed |= to[end] == NULL;
        Py_CLEAR(self->out[end]);
    }
    r = failed ? NULL : PyObject_CallFunctionObjArgs(
        callback, exc != NULL ? exc : Py_None, to[BACK] != NULL ? to[BACK] : Py_None,
        to[FRONT] != NULL ? to[FRONT] : Py_None, NULL);
    Py_XDECREF(to[FRONT]);
    Py_XDECREF(to[BACK]);
    Py_DECREF(callback);
    Py_DECREF(poller);
    Py_DECREF(self);  /* the registration's reference (own) */
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* own(poller, client_fd, primary_fd, disowned): read and write the two
 * sockets here from now on (the session has paused its transports'
 * reading, and nothing is waiting in their write buffers). */
static PyObject *
lane_own(Lane *self, PyObject *args)
{
    PyObject *poller, *disowned;
    int cfd, pfd, epfd;
    if (!PyArg_ParseTuple(args, "O!iiO:own", &PollerType, &poller, &cfd, &pfd, &disowned))
        return NULL;
    if (self->mode == OFF || self->poller != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "own() needs a lane that is on and owns nothing");
        return NULL;
    }
    epfd = ((Poller *)poller)->epfd;
    self->fd[FRONT] = cfd;
    self->fd[BACK] = pfd;
    for (int end = FRONT; end <= BACK; end++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &self->ends[end]};
        self->ends[end].lane = self;
        self->ends[end].side = end;
        self->out_off[end] = 0;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, self->fd[end], &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            if (end == BACK)
                epoll_ctl(epfd, EPOLL_CTL_DEL, cfd, NULL);
            return NULL;
        }
        self->events[end] = EPOLLIN;
    }
    self->broken = 0;
    self->poller = Py_NewRef(poller);
    self->disowned = Py_NewRef(disowned);
    Py_INCREF(self);  /* held while registered: the poller's events point here */
    Py_RETURN_NONE;
}

/* An unmirrored session's client chunk: the latency of what it asks runs
 * from the first chunk after the primary last answered. */
static int
plain_front(Lane *self)
{
    if (self->answered) {
        if (now(self, &self->waiting_since) < 0)
            return -1;
        self->answered = 0;
    }
    return 1;
}

/* A chunk of either side: forward it to the other, then count it, or hand
 * it back. */
static PyObject *
read_chunk(Lane *self, PyObject *data, int side)
{
    int rc;
    if (self->mode == OFF)
        return PyObject_CallOneArg(side == FRONT ? self->front_py : self->back_py, data);
    if (!PyBytes_CheckExact(data))
        return hand_back(self, side | UNWRITTEN, data);
    if (forward(self, side, data) < 0)
        return NULL;
    if (self->mode == OFF)  /* the write ended the session */
        Py_RETURN_NONE;
    if (side == FRONT)
        rc = self->mode == PLAIN ? plain_front(self) : dark_front(self, data);
    else
        rc = self->mode == PLAIN ? plain_back(self, data) : dark_back(self, data);
    if (rc < 0)
        return NULL;
    if (rc == 0)
        return hand_back(self, side, data);
    Py_RETURN_NONE;
}

/* data_received of the client connection. */
static PyObject *
lane_front(Lane *self, PyObject *data)
{
    return read_chunk(self, data, FRONT);
}

/* data_received of the primary connection. */
static PyObject *
lane_back(Lane *self, PyObject *data)
{
    return read_chunk(self, data, BACK);
}

static PyMethodDef lane_methods[] = {
    {"front", (PyCFunction)lane_front, METH_O, "A client chunk (the client's data_received)."},
    {"back", (PyCFunction)lane_back, METH_O, "A primary chunk (the primary's data_received)."},
    {"plain", (PyCFunction)lane_plain, METH_VARARGS,
     "plain(primary_write, client_write, stats, clock, skip, tail, waiting_since, answered)"},
    {"dark", (PyCFunction)lane_dark, METH_VARARGS,
     "dark(primary_write, client_write, stats, clock, skip, idle, down, min_unit, drops, "
     "skipped, changes, asked, ctx, generation)"},
    {"state", (PyCFunction)lane_state, METH_NOARGS,
     "(mode, skip, tail, waiting_since, answered, idle, pending times, counted), or None when off."},
    {"release", (PyCFunction)lane_release, METH_NOARGS, "Stop; return what state() would."},
    {"own", (PyCFunction)lane_own, METH_VARARGS,
     "own(poller, client_fd, primary_fd, disowned): read and write the sockets here."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
lane_mode(Lane *self, void *closure)
{
    return PyLong_FromLong(self->mode);
}

static PyObject *
lane_owning(Lane *self, void *closure)
{
    return PyBool_FromLong(self->poller != NULL);
}

static PyGetSetDef lane_getset[] = {
    {"mode", (getter)lane_mode, NULL, "0 off, 1 plain, 2 dark", NULL},
    {"owning", (getter)lane_owning, NULL, "whether it reads and writes the sockets itself", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway_postgres._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Lane(client_chunk, primary_chunk, handoff): see the module's comment.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_getset = lane_getset,
};


/* ----------------------------------------------------------------- Poller */

/* One epoll set per event loop, for the sockets of every Lane that owns its
 * session's sockets; the loop watches the set's descriptor and calls poll()
 * when any of them is ready. A chunk then costs a read, the Lane's work and a
 * write, with no transport callback and no Python frame in between: the
 * system calls pgbouncer makes for it. */

#define READ_SIZE (256 * 1024)  /* as the transports read */
#define BATCH 64

static char read_buffer[READ_SIZE];

/* The end ``side`` is readable: read a chunk and take it through the lane.
 * End of file or an error gives the sockets back, so that the transport
 * reads them and ends the connection as it does. */
static int
pump(Lane *self, int side)
{
    ssize_t n;
    PyObject *data, *r;
    do
        n = recv(self->fd[side], read_buffer, READ_SIZE, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;
    if (n <= 0)
        return disown(self, NULL);
    if ((data = PyBytes_FromStringAndSize(read_buffer, n)) == NULL)
        return -1;
    r = read_chunk(self, data, side);
    Py_DECREF(data);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
ready(Lane *self, int side, uint32_t events)
{
    if (events & (EPOLLERR | EPOLLHUP))
        return disown(self, NULL);  /* the transports tell the session what happened */
    if ((events & EPOLLOUT) && self->out[side] != NULL && flush(self, side) < 0)
        return -1;
    if (self->poller != NULL && !self->broken && (events & EPOLLIN) && self->out[1 - side] == NULL
            && pump(self, side) < 0)
        return -1;
    if (self->poller != NULL && self->broken)
        return disown(self, NULL);
    return 0;
}

static PyObject *
poller_poll(Poller *self, PyObject *unused)
{
    struct epoll_event events[BATCH];
    Lane *lanes[BATCH];
    int n;
    do
        n = epoll_wait(self->epfd, events, BATCH, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* Every Lane named here owns its sockets now, so it is alive; a chunk of
     * one may end another session (and its registration) before its turn. */
    for (int i = 0; i < n; i++) {
        lanes[i] = (Lane *)((struct End *)events[i].data.ptr)->lane;
        Py_INCREF(lanes[i]);
    }
    for (int i = 0; i < n; i++) {
        Lane *lane = lanes[i];
        int side = ((struct End *)events[i].data.ptr)->side;
        if (lane->poller == (PyObject *)self && ready(lane, side, events[i].events) < 0) {
            /* As a transport does when data_received raises: the session
             * ends, and the loop's exception handler hears of it. */
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            if (tb != NULL && exc != NULL)
                PyException_SetTraceback(exc, tb);
            if (lane->poller != NULL && exc != NULL) {
                Py_XDECREF(type);
                Py_XDECREF(tb);
                if (disown(lane, exc) < 0)
                    PyErr_WriteUnraisable((PyObject *)lane);
                Py_DECREF(exc);
            } else {
                PyErr_Restore(type, exc, tb);
                PyErr_WriteUnraisable((PyObject *)lane);
            }
        }
    }
    for (int i = 0; i < n; i++)
        Py_DECREF(lanes[i]);
    Py_RETURN_NONE;
}

static PyObject *
poller_fileno(Poller *self, PyObject *unused)
{
    return PyLong_FromLong(self->epfd);
}

static PyObject *
poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Poller *self;
    if (!PyArg_ParseTuple(args, ":Poller"))
        return NULL;
    if ((self = (Poller *)type->tp_alloc(type, 0)) == NULL)
        return NULL;
    if ((self->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static void
poller_dealloc(Poller *self)
{
    if (self->epfd >= 0)
        close(self->epfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef poller_methods[] = {
    {"poll", (PyCFunction)poller_poll, METH_NOARGS,
     "Serve the sockets that are ready (the event loop's reader callback)."},
    {"fileno", (PyCFunction)poller_fileno, METH_NOARGS, "The epoll descriptor to watch."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway_postgres._lane.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Poller(): the epoll set of the sockets lanes own; see the module's comment.",
    .tp_new = poller_new,
    .tp_dealloc = (destructor)poller_dealloc,
    .tp_methods = poller_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lane", NULL, -1, NULL,
};

PyMODINIT_FUNC
PyInit__lane(void)
{
    PyObject *m;
    const char *names[] = {"primary_units", "sum", "offered", "dropped", "skipped", "count",
                           "generation"};
    PyObject **slots[] = {&s_primary_units, &s_sum, &s_offered, &s_dropped, &s_skipped,
                          &s_count, &s_generation};
    for (int i = 0; i < 7; i++) {
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    }
    {
        PyObject *time_module = PyImport_ImportModule("time");
        if (time_module == NULL)
            return NULL;
        time_monotonic = PyObject_GetAttrString(time_module, "monotonic");
        Py_DECREF(time_module);
        if (time_monotonic == NULL)
            return NULL;
    }
    back_marks['Z'] = 1;
    front_marks['S'] = 1;
    for (const char *k = "QFPCdcf"; *k; k++)
        front_marks[(unsigned char)*k] = 2;
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&PollerType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&PollerType);
    if (PyModule_AddObject(m, "Poller", (PyObject *)&PollerType) < 0) {
        Py_DECREF(&PollerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
