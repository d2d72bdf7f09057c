/* Stepping over Postgres wire frames: the one loop the relay's two C modules
 * (_framewalk.c, _lane.c) share. Knows nothing but the frame header: "a type
 * byte, then an Int32 length that counts itself but not the type". */
#ifndef MIRRORGATE_FRAMES_H
#define MIRRORGATE_FRAMES_H

#include <Python.h>
#include <stdint.h>

/* The big-endian Int32 after a frame's type byte. */
static inline int32_t
frame_length(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16)
                     | ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

/* Step over the frames of p[0..n) whose header is whole, from *pos (a frame
 * boundary), as framewalk.tally does: *found counts the frames whose table
 * entry has bit 1, *flags gathers every frame's entry, *last is where the
 * last counted frame ends. On return *pos is where the walk stopped (as
 * framewalk.walk's ``next``).
 *
 * :returns: 0; or -1 at a length word below 4, with *pos at that frame and
 *     *length what it said (nothing after it is counted). */
static inline int
tally_frames(const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos, const unsigned char *table,
             Py_ssize_t *found, long *flags, Py_ssize_t *last, int32_t *length)
{
    Py_ssize_t at = *pos;
    while (at >= 0 && n - at >= 5) {
        unsigned char mark = table[p[at]];
        int32_t len = frame_length(p + at + 1);
        if (len < 4) {
            *pos = at;
            *length = len;
            return -1;
        }
        at += 1 + (Py_ssize_t)len;
        *flags |= mark;
        if (mark & 1) {
            (*found)++;
            *last = at;
        }
    }
    *pos = at;
    return 0;
}

#endif
