// What layer.c shares with files.c: the session channel's message framing and sending, the
// debug line, and how the layer finds the functions it wraps. Hidden from the app (the whole
// layer is built with -fvisibility=hidden).
#ifndef MIRRORD_CHANNEL_H
#define MIRRORD_CHANNEL_H

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

// A line on stderr under MIRRORD_LAYER_DEBUG=1.
void dbg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// One message to the session, packed on the stack (no malloc: hooks may run in signal
// handlers): frame_begin(code, n) packs [code, pid, ...] and n more fields follow.
struct frame {
    char data[4608];
    size_t size;
    int overflow;
    msgpack_packer pk;
};
void frame_begin(struct frame *f, int code, uint32_t fields);
void pack_str(struct frame *f, const char *s);
// Connects first when this process has no connection yet; a frame that overflowed is dropped.
void send_frame(struct frame *f);
// Whether this process's connection to the session is up (a waiter gives up when it is not).
int channel_up(void);

// The files feature (files.c): its settings from the environment, and the session's answers
// to its requests, handed over by the channel's reader thread.
void files_init(void);
void files_on_message(uint64_t code, const msgpack_object *fields, uint32_t count);
// At fork: the child's requests start afresh (the parent's waiters are not in it).
void files_after_fork_child(void);
// statx(2) made through syscall() (libuv does): 1 when the path is the target's and *rc holds
// the result, 0 when it is local.
struct statx;
int files_statx(int dirfd, const char *path, int flags, struct statx *sx, long *rc);

// The next definition of `name` (libc's), looked up once; a hook may run before any
// constructor.
static inline void *real_symbol(void **slot, const char *name) {
    void *p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (!p) {
        p = dlsym(RTLD_NEXT, name);
        __atomic_store_n(slot, p, __ATOMIC_RELEASE);
    }
    return p;
}

// Session message codes: src/session/layer-messages.ts (LayerCode).
enum {
    LAYER_HELLO = 0x01,
    LAYER_LISTEN = 0x02,
    LAYER_CLOSE = 0x03,
    LAYER_LOOKUP = 0x04,
    LAYER_FILE = 0x05,
    SESSION_PEER = 0x10,
    SESSION_SHARED = 0x11,
    SESSION_FILE_REPLY = 0x12,
    SESSION_FILE_DATA = 0x13,
};

#endif
