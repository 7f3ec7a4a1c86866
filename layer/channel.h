// What layer.c shares with files.c and outgoing.c: the session channel's message framing and
// sending, the debug line, how the layer finds the functions it wraps, and the socket objects'
// outgoing state. Hidden from the app (the whole layer is built with -fvisibility=hidden).
#ifndef MIRRORD_CHANNEL_H
#define MIRRORD_CHANNEL_H

#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

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
// Returns the generation of the connection it was written to, 0 when it was not sent.
uint32_t send_frame(struct frame *f);
// Whether this process's connection to the session is up (a waiter gives up when it is not).
int channel_up(void);

// What the features share for reading the session's answers: a CLOCK_MONOTONIC deadline ms
// from now; a msgpack string as a C string in out (-1 when it is none or does not fit); the
// errno an errno name stands for (EIO for a name not known here).
struct timespec;
void deadline_in(struct timespec *deadline, long ms);
int str_of(const msgpack_object *o, char *out, size_t n);
int errno_named(const msgpack_object *o);
// Whether the connection of that generation is still the one up: an answer to what was sent on
// it can still come (the session does not answer on a later connection).
int channel_alive(uint32_t generation);

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

// real_NAME(): the next definition of NAME, of type `type` (see real_symbol).
#define REAL(type, name)                                                                           \
    static void *real_##name##_slot;                                                               \
    static type real_##name(void) {                                                                \
        type f = (type)real_symbol(&real_##name##_slot, #name);                                    \
        return f;                                                                                  \
    }

// If dlsym cannot find the next definition (should not happen), fail like a bad fd would.
#define CALL_REAL(name, ...) (real_##name() ? real_##name()(__VA_ARGS__) : (errno = ENOSYS, -1))

// ---- the outgoing feature (outgoing.c) ----

// Its settings from the environment; the session's answers to its requests, handed over by the
// channel's reader thread; the loss of the channel (its waiters give up); at fork, the child's
// requests start afresh.
void outgoing_init(void);
void outgoing_on_message(uint64_t code, const msgpack_object *fields, uint32_t count);
void outgoing_on_channel_lost(void);
void outgoing_after_fork_child(void);

union inet_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
};

// A destination of the app's socket that the session relays: the socket really talks to the
// session's port `port` on loopback (::1 when loopback6, else 127.0.0.1, v4-mapped on an IPv6
// socket).
struct relay {
    union inet_sockaddr destination; // as the app gave it
    uint16_t port;                   // 0: a free slot
    uint8_t loopback6;
};

// What the outgoing feature keeps on a socket object (layer.c's table: shared by dup'd fds,
// forgotten at the last close). A UDP socket has a relay per destination it sent to, the oldest
// forgotten first; a TCP one has one.
#define RELAYS_MAX 8
struct outgoing {
    int family; // the socket's, AF_INET or AF_INET6; 0: not a socket of the feature's
    struct relay relays[RELAYS_MAX];
    uint8_t next;              // the slot the next relay takes
    union inet_sockaddr local; // TCP: the agent's socket in the target, in the socket's family
    socklen_t local_len;       // 0: getsockname is the kernel's
};

// fd's outgoing state with the object table locked (layer.c), made when `create`; NULL, and
// not locked, when fd has none (or the table is full). outgoing_unlock releases the table.
struct outgoing *outgoing_lock(int fd, int create);
void outgoing_unlock(void);
// The destination that `from` stands for when it is one of o's relays (what getpeername and
// recvfrom report instead): its length into *out, 0 when from is no relay of o's.
socklen_t outgoing_destination(const struct outgoing *o, const struct sockaddr_storage *from,
                               union inet_sockaddr *out);

// Session message codes: src/session/layer-messages.ts (LayerCode).
enum {
    LAYER_HELLO = 0x01,
    LAYER_LISTEN = 0x02,
    LAYER_CLOSE = 0x03,
    LAYER_LOOKUP = 0x04,
    LAYER_FILE = 0x05,
    LAYER_CONNECT = 0x06,
    LAYER_RESOLVE = 0x07,
    SESSION_PEER = 0x10,
    SESSION_SHARED = 0x11,
    SESSION_FILE_REPLY = 0x12,
    SESSION_FILE_DATA = 0x13,
    SESSION_CONNECTED = 0x14,
    SESSION_RESOLVED = 0x15,
};

#endif
