// mirrord_layer.so: LD_PRELOADed into the local app (and inherited by its children).
//
// Hooks bind/listen/accept/accept4/getsockname/getpeername/close/dup/dup2/dup3 for TCP
// sockets (AF_INET, AF_INET6) so that:
//  1. the session learns which ports the app listens on: one msgpack message per event on a
//     unix stream socket named by MIRRORD_LAYER_SOCKET (one connection per process, opened with
//     a hello carrying MIRRORD_LAYER_TOKEN), in the agent protocol's framing (a u32 big-endian
//     length and a msgpack array of messages, each [code, ...fields]; the codes and fields are
//     those of src/session/layer-messages.ts), written and read with msgpack-c, linked in;
//  2. a bind to a taken (EADDRINUSE) or privileged (EACCES) port still works: it binds the same
//     address with port 0 and getsockname reports the requested port;
//  3. accept/getpeername report the original remote client of each replayed connection, known
//     by the source port of the session's local replay connection and the app's port it reached:
//     the session pushes it (`peer`) to the processes that listen on that port, for one that
//     listens alone, and any other asks for it (`lookup`): a pre-fork worker that inherited the
//     listener, one of several processes the session said listen on the port (`shared`), or a
//     process handed the accepted socket (a Node cluster primary passes it to a worker).
// files.c hooks the calls on paths (open, stat, readlink, directories...) for the files feature,
// and outgoing.c connect, sendto/sendmsg/sendmmsg, recvfrom/recvmsg/recvmmsg, getaddrinfo and
// gethostbyname* for the outgoing one (connections and look-ups through the target); that one's
// state on a socket lives on the objects here, so getpeername and getsockname report it too.
// Without MIRRORD_LAYER_SOCKET, or when the session cannot be reached, the app runs as if the
// layer were not there. Nothing is printed unless MIRRORD_LAYER_DEBUG=1.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>

#include "channel.h"
#include "replay_source.h"

#define EXPORT __attribute__((visibility("default")))

// Fixed tables: fds at or above FD_MAX are not tracked (they behave as if unhooked). Each
// connection the app makes through the target takes an object, so there is room for pools of
// them.
#define FD_MAX 65536
#define OBJ_MAX 4096
// How long accept waits for the session's word on a replayed connection's original client. The
// session sends it as soon as its connect completes, so this is only reached when the CLI is
// starved of CPU (a thousand connections opened at once on a busy machine); a miss then costs
// the app the real client's address, so the bound is generous.
#define PEER_WAIT_MS 1000
#define PEER_TTL_MS 30000
#define LINE_MAX_LEN 512
// The session's frames: a few dozen bytes (a resolved name's addresses, a few hundred), or a
// file's contents in pieces of up to a MiB (the agent's reads); one longer than this is not the
// session's.
#define FRAME_MAX (1024 * 1024 + 1024)

// ---- real functions, resolved lazily (a hook may run before any constructor) ----

typedef int (*socket_fn)(int, int, int);
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*listen_fn)(int, int);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*name_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*close_fn)(int);
typedef int (*dup_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);
typedef long (*syscall_fn)(long, ...);
typedef int (*fcntl_fn)(int, int, ...);

// The next definition of each wrapped function (see REAL in channel.h).
REAL(socket_fn, socket)
REAL(bind_fn, bind)
REAL(connect_fn, connect)
REAL(listen_fn, listen)
REAL(accept_fn, accept)
REAL(accept4_fn, accept4)
REAL(name_fn, getsockname)
REAL(name_fn, getpeername)
REAL(close_fn, close)
REAL(dup_fn, dup)
REAL(dup2_fn, dup2)
REAL(dup3_fn, dup3)
REAL(syscall_fn, syscall)
REAL(fcntl_fn, fcntl)
REAL(fcntl_fn, fcntl64)

// ---- configuration and state ----

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
// MIRRORD_LAYER_SOCKET, NULL when unset or empty; copied, as every setting is: a server that sets
// its process title (nginx, postgres) writes over the environment's original strings.
static const char *layer_path;
static char layer_path_copy[PATH_MAX];
static int debug_on;

// mu guards the fd/object/peer tables; send_mu guards conn_fd and writes to it.
// Lock order: send_mu before mu (code never takes send_mu while holding mu).
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t send_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t peer_cv; // initialised in do_init (CLOCK_MONOTONIC)
static int conn_fd = -1;
static uint32_t conn_generation; // counts the connections made (under send_mu)
// The generation of the connection that is up, 0 when none; read without lock (atomic).
static uint32_t conn_live;

// A socket object: what the layer knows about one open file description. Several fds (dup) may
// refer to it; refs counts them.
struct obj {
    int used;
    int refs;
    uint16_t req_port;   // port the app asked for; non-zero when getsockname must lie
    uint16_t local_port; // port actually bound (listening sockets)
    uint8_t family;      // 4 or 6
    uint8_t listening;   // listen() seen
    uint8_t reported;    // this process sent the "listen" event (close must be reported)
    uint8_t shared;      // other processes accept on this port too (forked, or told so)
    uint8_t has_peer;    // getpeername must report peer
    uint8_t peer_looked; // the original client was looked for (found or not): never again
    socklen_t peer_len;
    struct sockaddr_storage peer;
    struct outgoing out; // connections through the target (outgoing.c)
};

static int16_t fd_map[FD_MAX]; // object index + 1, 0 = untracked
static struct obj objs[OBJ_MAX];
// Where obj_new looks first: past the last one taken, so that it rarely scans the whole table.
static int obj_hint;

// The original client of a replayed connection, by the session's source port and the app's
// local port it connected to: the kernel gives one source port to connections to different ports
// at once, so a source port alone may name another port's connection. A set of ways per source
// port, so however many connections wait to be accepted, none is forgotten unless one source
// port is in use towards more than PEER_WAYS of this process's ports at once (then the oldest is
// forgotten, and its accept reports no original client rather than a wrong one). 4 MiB of bss
// that is only paged in where used; an entry is valid only in the generation it was written in,
// so a lost session forgets them all without touching the table.
#define PEER_WAYS 2
struct peer_entry {
    uint32_t generation;
    uint16_t local_port; // the app's port the replay connected to
    uint8_t family;      // AF_INET or AF_INET6
    uint16_t port;       // network order
    uint8_t addr[16];
    uint64_t at_ms;
};
static struct peer_entry peers[65536][PEER_WAYS];
static uint32_t peer_generation = 1;
static char layer_token[128]; // MIRRORD_LAYER_TOKEN: proves to the session that we are its app

// Lookups waiting for the session's answer, one per thread in accept or getpeername. Pushed
// peers cannot serve a process that did not listen: the session pushes to listeners only, and
// with several processes accepting, a copy left unused in one of them may be taken for a later
// connection from the same source port. A lookup names the accepted socket (its inode, the same
// in every process holding it), and the session answers each socket with the connection it was.
#define LOOKUP_MAX 64
struct lookup {
    int used;
    int done;
    uint16_t source_port; // the replay connection's
    unsigned long long socket;
    struct sockaddr_storage peer;
};
static struct lookup lookups[LOOKUP_MAX];

void dbg(const char *fmt, ...) {
    if (!debug_on)
        return;
    char buf[LINE_MAX_LEN];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    fprintf(stderr, "mirrord-layer[%d]: %s\n", (int)getpid(), buf);
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void atfork_prepare(void) {
    pthread_mutex_lock(&send_mu);
    pthread_mutex_lock(&mu);
}

static void atfork_parent(void) {
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&send_mu);
}

// The child gets a copy of the tables but not the reader thread, and must not share the
// parent's unix connection: it opens its own on its first event. Inherited listening sockets
// were announced by the parent, so the child does not report their close, and asks for the
// peers of the connections it accepts on them (a pre-fork worker).
static void atfork_child(void) {
    files_after_fork_child();
    outgoing_after_fork_child();
    pthread_mutex_init(&mu, NULL);
    pthread_mutex_init(&send_mu, NULL);
    if (conn_fd >= 0)
        CALL_REAL(close, conn_fd);
    conn_fd = -1;
    __atomic_store_n(&conn_live, 0, __ATOMIC_RELEASE);
    for (int i = 0; i < OBJ_MAX; i++) {
        objs[i].reported = 0;
        if (objs[i].listening)
            objs[i].shared = 1;
    }
    memset(lookups, 0, sizeof lookups); // the parent's other threads' lookups
    peer_generation++;
}

static void do_init(void) {
    const char *p = getenv("MIRRORD_LAYER_SOCKET");
    if (p && *p && strlen(p) < sizeof layer_path_copy)
        layer_path = strcpy(layer_path_copy, p);
    const char *t = getenv("MIRRORD_LAYER_TOKEN");
    if (t && strlen(t) < sizeof layer_token && !strpbrk(t, "\"\\"))
        strcpy(layer_token, t);
    const char *d = getenv("MIRRORD_LAYER_DEBUG");
    debug_on = d && strcmp(d, "1") == 0;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&peer_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    files_init();
    outgoing_init();
}

static void init(void) { pthread_once(&init_once, do_init); }

__attribute__((constructor)) static void layer_ctor(void) { init(); }

// ---- socket helpers ----

// family (AF_INET/AF_INET6) when fd is a TCP socket of those families, else 0.
static int tcp_family(int fd) {
    int v;
    socklen_t l = sizeof v;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &l) != 0 || (v != AF_INET && v != AF_INET6))
        return 0;
    int fam = v;
    l = sizeof v;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &l) != 0 || v != SOCK_STREAM)
        return 0;
    l = sizeof v;
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &l) != 0 || v != IPPROTO_TCP)
        return 0;
    return fam;
}

static uint16_t sa_port(const struct sockaddr_storage *ss) {
    if (ss->ss_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)ss)->sin_port);
    if (ss->ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    return 0;
}

// The port an accepted socket really has (the kernel's, not the one getsockname reports for a
// fallback-bound listener): the one the session's replay connected to.
static uint16_t local_port_of(int fd) {
    struct sockaddr_storage ss;
    socklen_t l = sizeof ss;
    if (CALL_REAL(getsockname, fd, (struct sockaddr *)&ss, &l) != 0)
        return 0;
    return sa_port(&ss);
}

static void sa_set_port(struct sockaddr_storage *ss, uint16_t port) {
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons(port);
    else if (ss->ss_family == AF_INET6)
        ((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
}

static void sa_addr_str(const struct sockaddr_storage *ss, char *out, size_t n) {
    out[0] = 0;
    if (ss->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, out, n);
    else if (ss->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, out, n);
}

// The session replays from replay_source_ipv4, so only connections from there wait for their
// original peer: a developer's own client on 127.0.0.1 is neither delayed nor rewritten. Plain or
// v4-mapped.
static int sa_is_replay_source(const struct sockaddr_storage *ss) {
    if (ss->ss_family == AF_INET)
        return memcmp(&((const struct sockaddr_in *)ss)->sin_addr, replay_source_ipv4, 4) == 0;
    if (ss->ss_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
        return IN6_IS_ADDR_V4MAPPED(a) && memcmp(&a->s6_addr[12], replay_source_ipv4, 4) == 0;
    }
    return 0;
}

// ---- object table (call with mu held) ----

static int obj_of(int fd) {
    if (fd < 0 || fd >= FD_MAX)
        return -1;
    return fd_map[fd] - 1;
}

static int obj_new(void) {
    for (int n = 0; n < OBJ_MAX; n++) {
        int i = (obj_hint + n) % OBJ_MAX;
        if (!objs[i].used) {
            memset(&objs[i], 0, sizeof objs[i]);
            objs[i].used = 1;
            obj_hint = (i + 1) % OBJ_MAX;
            return i;
        }
    }
    dbg("object table full");
    return -1;
}

// Attaches fd to object i (which gains a reference). Returns 0, or -1 if fd cannot be tracked.
static int fd_attach(int fd, int i) {
    if (fd < 0 || fd >= FD_MAX || i < 0)
        return -1;
    __atomic_store_n(&fd_map[fd], (int16_t)(i + 1), __ATOMIC_RELAXED);
    objs[i].refs++;
    return 0;
}

// Detaches fd from its object. When that was the last reference, frees the object and returns
// the port to report closed (0: nothing to report).
static uint16_t fd_detach(int fd) {
    int i = obj_of(fd);
    if (i < 0)
        return 0;
    __atomic_store_n(&fd_map[fd], 0, __ATOMIC_RELAXED);
    struct obj *o = &objs[i];
    if (--o->refs > 0)
        return 0;
    uint16_t port = (o->listening && o->reported) ? (o->req_port ? o->req_port : o->local_port) : 0;
    o->used = 0;
    return port;
}

// Object for fd, created (with fd attached) when missing.
static int obj_get_or_new(int fd) {
    int i = obj_of(fd);
    if (i >= 0)
        return i;
    if (fd < 0 || fd >= FD_MAX)
        return -1;
    i = obj_new();
    if (i >= 0)
        fd_attach(fd, i);
    return i;
}

struct outgoing *outgoing_lock(int fd, int create) {
    if (fd < 0 || fd >= FD_MAX || (!create && !__atomic_load_n(&fd_map[fd], __ATOMIC_RELAXED)))
        return NULL;
    pthread_mutex_lock(&mu);
    int i = create ? obj_get_or_new(fd) : obj_of(fd);
    if (i < 0 || (!create && !objs[i].out.family)) {
        pthread_mutex_unlock(&mu);
        return NULL;
    }
    return &objs[i].out;
}

void outgoing_unlock(void) { pthread_mutex_unlock(&mu); }

// ---- the unix connection to the session ----

static void handle_frame(const char *body, size_t size);
static void after_dup(int oldfd, int newfd);

static void *reader_main(void *arg) {
    int fd = (int)(intptr_t)arg;
    // Not on the thread's 64 KiB stack.
    char *buf = malloc(4 + FRAME_MAX);
    size_t len = 0;
    if (!buf)
        goto gone;
    for (;;) {
        ssize_t n = recv(fd, buf + len, 4 + FRAME_MAX - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        size_t at = 0;
        while (len - at >= 4) {
            uint32_t size;
            memcpy(&size, buf + at, 4);
            size = ntohl(size);
            if (size > FRAME_MAX) {
                dbg("a frame of %u bytes is not the session's", size);
                goto gone;
            }
            if (len - at < 4 + (size_t)size)
                break;
            handle_frame(buf + at + 4, size);
            at += 4 + (size_t)size;
        }
        // Only once a frame was taken: a MiB frame arrives in many reads, and moving what came
        // of it onto itself after each one cost more than the frame's own copies.
        if (at > 0) {
            len -= at;
            memmove(buf, buf + at, len);
        }
    }
gone:
    free(buf);
    dbg("session connection closed");
    pthread_mutex_lock(&send_mu);
    if (conn_fd == fd) {
        CALL_REAL(close, fd);
        conn_fd = -1;
        __atomic_store_n(&conn_live, 0, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&send_mu);
    outgoing_on_channel_lost();
    return NULL;
}

// ---- messages to the session: one frame each, packed on the stack (no malloc: close() may
// run in a signal handler) ----

static int frame_write(void *data, const char *buf, size_t len) {
    struct frame *f = data;
    if (f->size + len > sizeof f->data) {
        f->overflow = 1;
        return -1;
    }
    memcpy(f->data + f->size, buf, len);
    f->size += len;
    return 0;
}

// Starts a frame of one message [code, pid, ...]: `fields` more follow the pid.
void frame_begin(struct frame *f, int code, uint32_t fields) {
    f->size = 4; // the length, set by frame_end
    f->overflow = 0;
    msgpack_packer_init(&f->pk, f, frame_write);
    msgpack_pack_array(&f->pk, 1);
    msgpack_pack_array(&f->pk, 2 + fields);
    msgpack_pack_int(&f->pk, code);
    msgpack_pack_int(&f->pk, (int)getpid());
}

void pack_str(struct frame *f, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(&f->pk, n);
    msgpack_pack_str_body(&f->pk, s, n);
}

// The frame's bytes, or 0 when it did not fit.
static size_t frame_end(struct frame *f) {
    if (f->overflow)
        return 0;
    uint32_t size = htonl((uint32_t)(f->size - 4));
    memcpy(f->data, &size, 4);
    return f->size;
}

// Call with send_mu held. Connects when not connected; returns conn_fd or -1.
static int ensure_connected(void) {
    if (conn_fd >= 0 || !layer_path)
        return conn_fd;
    struct sockaddr_un sun;
    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    if (strlen(layer_path) >= sizeof sun.sun_path) {
        dbg("MIRRORD_LAYER_SOCKET path too long");
        return -1;
    }
    strcpy(sun.sun_path, layer_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    // Non-blocking connect: a full backlog fails at once instead of stalling the app. The real
    // one: the app's connect is outgoing.c's.
    if (CALL_REAL(connect, fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
        dbg("cannot reach session at %s: %s", layer_path, strerror(errno));
        CALL_REAL(close, fd);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    // The reader thread must not run the app's signal handlers.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int rc = pthread_create(&t, &attr, reader_main, (void *)(intptr_t)fd);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        dbg("cannot start reader thread");
        CALL_REAL(close, fd);
        return -1;
    }
    // The socket is reachable by other users (an app may drop privileges), so the session
    // listens only to connections that first show the token it gave the app.
    struct frame hello;
    frame_begin(&hello, LAYER_HELLO, 1);
    pack_str(&hello, layer_token);
    size_t n = frame_end(&hello);
    if (n == 0 || send(fd, hello.data, n, MSG_NOSIGNAL) != (ssize_t)n) {
        dbg("cannot greet the session: %s", strerror(errno));
        shutdown(fd, SHUT_RDWR); // the reader thread sees it and closes the fd
        return -1;
    }
    conn_fd = fd;
    if (++conn_generation == 0) // 0 is no connection's
        conn_generation = 1;
    __atomic_store_n(&conn_live, conn_generation, __ATOMIC_RELEASE);
    dbg("connected to session at %s", layer_path);
    return fd;
}

int channel_up(void) { return __atomic_load_n(&conn_live, __ATOMIC_ACQUIRE) != 0; }

int channel_alive(uint32_t generation) {
    return generation != 0 && __atomic_load_n(&conn_live, __ATOMIC_ACQUIRE) == generation;
}

uint32_t send_frame(struct frame *f) {
    size_t len = frame_end(f);
    if (len == 0)
        return 0;
    uint32_t sent_on = 0;
    pthread_mutex_lock(&send_mu);
    int fd = ensure_connected();
    if (fd >= 0) {
        size_t off = 0;
        while (off < len) {
            ssize_t n = send(fd, f->data + off, len - off, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                dbg("send to session failed: %s", strerror(errno));
                shutdown(fd, SHUT_RDWR); // the reader thread sees it and closes the fd
                break;
            }
            off += (size_t)n;
        }
        if (off == len)
            sent_on = conn_generation;
    }
    pthread_mutex_unlock(&send_mu);
    return sent_on;
}

static void report_listen(uint16_t port, uint16_t local_port, int family, const char *address) {
    struct frame f;
    frame_begin(&f, LAYER_LISTEN, 4);
    msgpack_pack_uint16(&f.pk, port);
    msgpack_pack_uint16(&f.pk, local_port);
    msgpack_pack_int(&f.pk, family);
    pack_str(&f, address);
    send_frame(&f);
}

static void report_close(uint16_t port) {
    struct frame f;
    frame_begin(&f, LAYER_CLOSE, 1);
    msgpack_pack_uint16(&f.pk, port);
    send_frame(&f);
}

// `shared`: other processes listen on local_port too (Node cluster workers handed one listener,
// SO_REUSEPORT): peers pushed here may have been for them, so accepts on it ask.
static void handle_shared(uint64_t local_port) {
    if (local_port == 0 || local_port > 65535)
        return;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < OBJ_MAX; i++) {
        if (objs[i].used && objs[i].listening && objs[i].local_port == local_port)
            objs[i].shared = 1;
    }
    pthread_mutex_unlock(&mu);
    dbg("other processes listen on local port %llu too", (unsigned long long)local_port);
}

static int peer_live(const struct peer_entry *e) {
    return e->generation == peer_generation && now_ms() - e->at_ms <= PEER_TTL_MS;
}

// Call with mu held. The way of a source port's set to write local_port's entry in: its own,
// else a free or expired one, else the oldest.
static struct peer_entry *peer_way(struct peer_entry *set, uint16_t local_port) {
    struct peer_entry *oldest = &set[0];
    for (int w = 0; w < PEER_WAYS; w++) {
        if (set[w].generation == peer_generation && set[w].local_port == local_port)
            return &set[w];
    }
    for (int w = 0; w < PEER_WAYS; w++) {
        if (!peer_live(&set[w]))
            return &set[w];
        if (set[w].at_ms < oldest->at_ms)
            oldest = &set[w];
    }
    return oldest;
}

// `peer`: the original client of the replayed connection from source_port to the app's
// local_port; with `socket`, the answer to a lookup about that socket.
static void handle_peer(uint64_t source_port, uint64_t local_port, const char *addr, uint64_t port,
                        const char *id) {
    if (source_port == 0 || source_port > 65535 || local_port == 0 || local_port > 65535 ||
        port > 65535) {
        dbg("bad peer: ports %llu %llu %llu", (unsigned long long)source_port,
            (unsigned long long)local_port, (unsigned long long)port);
        return;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
    } else if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
    } else {
        dbg("bad peer address: %s", addr);
        return;
    }
    if (id) {
        // The answer to a lookup: for the thread that asked about this socket.
        unsigned long long socket = strtoull(id, NULL, 10);
        pthread_mutex_lock(&mu);
        for (int i = 0; i < LOOKUP_MAX; i++) {
            struct lookup *l = &lookups[i];
            if (l->used && !l->done && l->source_port == source_port && l->socket == socket) {
                l->peer = ss;
                l->done = 1;
            }
        }
        pthread_cond_broadcast(&peer_cv);
        pthread_mutex_unlock(&mu);
        dbg("peer of socket %llu: %s:%llu", socket, addr, (unsigned long long)port);
        return;
    }
    pthread_mutex_lock(&mu);
    struct peer_entry *e = peer_way(peers[source_port], (uint16_t)local_port);
    e->generation = peer_generation;
    e->local_port = (uint16_t)local_port;
    e->at_ms = now_ms();
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        e->family = AF_INET;
        e->port = s4->sin_port;
        memcpy(e->addr, &s4->sin_addr, 4);
    } else {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        e->family = AF_INET6;
        e->port = s6->sin6_port;
        memcpy(e->addr, &s6->sin6_addr, 16);
    }
    pthread_cond_broadcast(&peer_cv);
    pthread_mutex_unlock(&mu);
    dbg("peer for source port %llu to local port %llu: %s:%llu", (unsigned long long)source_port,
        (unsigned long long)local_port, addr, (unsigned long long)port);
}

int str_of(const msgpack_object *o, char *out, size_t n) {
    if (o->type != MSGPACK_OBJECT_STR || o->via.str.size >= n)
        return -1;
    memcpy(out, o->via.str.ptr, o->via.str.size);
    out[o->via.str.size] = 0;
    return 0;
}

int errno_named(const msgpack_object *o) {
    static const struct {
        const char *name;
        int value;
    } names[] = {
        // The files feature's (see src/features/files/agent.ts).
        {"ENOENT", ENOENT},
        {"EACCES", EACCES},
        {"ENOTDIR", ENOTDIR},
        {"EISDIR", EISDIR},
        {"ELOOP", ELOOP},
        {"EINVAL", EINVAL},
        {"ENAMETOOLONG", ENAMETOOLONG},
        {"EMFILE", EMFILE},
        {"EFBIG", EFBIG},
        {"EPERM", EPERM},
        {"EBADF", EBADF},
        // The outgoing feature's: a connect's, as the target's own failed.
        {"ECONNREFUSED", ECONNREFUSED},
        {"ETIMEDOUT", ETIMEDOUT},
        {"EHOSTUNREACH", EHOSTUNREACH},
        {"ENETUNREACH", ENETUNREACH},
        {"ECONNRESET", ECONNRESET},
        {"EADDRNOTAVAIL", EADDRNOTAVAIL},
        {"EAFNOSUPPORT", EAFNOSUPPORT},
    };
    if (o->type != MSGPACK_OBJECT_STR)
        return EIO;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        size_t n = strlen(names[i].name);
        if (o->via.str.size == n && memcmp(o->via.str.ptr, names[i].name, n) == 0)
            return names[i].value;
    }
    return EIO;
}

static int uint_of(const msgpack_object *o, uint64_t *out) {
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return -1;
    *out = o->via.u64;
    return 0;
}

// One frame from the session: an array of messages [code, ...fields]. Messages of other codes
// are skipped (room for later ones).
static void handle_frame(const char *body, size_t size) {
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    if (msgpack_unpack_next(&u, body, size, &off) != MSGPACK_UNPACK_SUCCESS ||
        u.data.type != MSGPACK_OBJECT_ARRAY) {
        dbg("a frame from the session that is no array of messages");
        msgpack_unpacked_destroy(&u);
        return;
    }
    for (uint32_t i = 0; i < u.data.via.array.size; i++) {
        const msgpack_object *m = &u.data.via.array.ptr[i];
        uint64_t code;
        if (m->type != MSGPACK_OBJECT_ARRAY || m->via.array.size == 0 ||
            uint_of(&m->via.array.ptr[0], &code) != 0)
            continue;
        const msgpack_object *f = m->via.array.ptr;
        uint64_t source_port, local_port, port;
        char addr[INET6_ADDRSTRLEN + 1], id[24];
        if (code == SESSION_SHARED && m->via.array.size == 2 && uint_of(&f[1], &local_port) == 0) {
            handle_shared(local_port);
        } else if (code == SESSION_PEER && m->via.array.size == 6 &&
                   uint_of(&f[1], &source_port) == 0 && uint_of(&f[2], &local_port) == 0 &&
                   str_of(&f[3], addr, sizeof addr) == 0 && uint_of(&f[4], &port) == 0 &&
                   (f[5].type == MSGPACK_OBJECT_NIL || str_of(&f[5], id, sizeof id) == 0)) {
            handle_peer(source_port, local_port, addr, port,
                        f[5].type == MSGPACK_OBJECT_NIL ? NULL : id);
        } else if (code == SESSION_FILE_REPLY || code == SESSION_FILE_DATA) {
            files_on_message(code, f, m->via.array.size);
        } else if (code == SESSION_CONNECTED || code == SESSION_RESOLVED) {
            outgoing_on_message(code, f, m->via.array.size);
        } else {
            dbg("a message from the session of code %llu that is not understood",
                (unsigned long long)code);
        }
    }
    msgpack_unpacked_destroy(&u);
}

// Call with mu held. Takes (removes) the entry of the connection from source_port to
// local_port into out.
static int peer_take(uint16_t source_port, uint16_t local_port, struct sockaddr_storage *out) {
    struct peer_entry *e = NULL;
    for (int w = 0; w < PEER_WAYS && !e; w++) {
        if (peers[source_port][w].generation == peer_generation &&
            peers[source_port][w].local_port == local_port)
            e = &peers[source_port][w];
    }
    if (!e)
        return 0;
    int live = peer_live(e);
    e->generation = 0;
    if (!live)
        return 0;
    memset(out, 0, sizeof *out);
    if (e->family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)out;
        s4->sin_family = AF_INET;
        s4->sin_port = e->port;
        memcpy(&s4->sin_addr, e->addr, 4);
    } else {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)out;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = e->port;
        memcpy(&s6->sin6_addr, e->addr, 16);
    }
    return 1;
}

void deadline_in(struct timespec *dl, long ms) {
    clock_gettime(CLOCK_MONOTONIC, dl);
    dl->tv_sec += ms / 1000;
    dl->tv_nsec += (ms % 1000) * 1000000L;
    if (dl->tv_nsec >= 1000000000L) {
        dl->tv_sec++;
        dl->tv_nsec -= 1000000000L;
    }
}

// The original client of the replayed connection from source port sport to the app's port
// lport, as pushed to this process (the one that listened). The session sends it right after
// connecting: waits briefly.
static int wait_pushed(uint16_t sport, uint16_t lport, struct sockaddr_storage *out) {
    if (!channel_up())
        return 0;
    struct timespec dl;
    deadline_in(&dl, PEER_WAIT_MS);
    int have;
    pthread_mutex_lock(&mu);
    while (!(have = peer_take(sport, lport, out))) {
        if (!channel_up())
            break;
        if (pthread_cond_timedwait(&peer_cv, &mu, &dl) == ETIMEDOUT) {
            have = peer_take(sport, lport, out);
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    return have;
}

// The original client of the replayed connection that socket fd is (source port sport, the
// app's port lport), asked of the session: for a process that did not listen, or did not accept
// fd itself.
static int lookup_peer(int fd, uint16_t sport, uint16_t lport, struct sockaddr_storage *out) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return 0;
    unsigned long long socket = (unsigned long long)st.st_ino;
    int slot = -1;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < LOOKUP_MAX && slot < 0; i++) {
        if (!lookups[i].used) {
            memset(&lookups[i], 0, sizeof lookups[i]);
            lookups[i].used = 1;
            lookups[i].source_port = sport;
            lookups[i].socket = socket;
            slot = i;
        }
    }
    pthread_mutex_unlock(&mu);
    if (slot < 0) {
        dbg("too many lookups at once");
        return 0;
    }
    struct frame f;
    frame_begin(&f, LAYER_LOOKUP, 3);
    msgpack_pack_uint16(&f.pk, sport);
    msgpack_pack_uint16(&f.pk, lport);
    char id[24];
    snprintf(id, sizeof id, "%llu", socket);
    pack_str(&f, id);
    send_frame(&f); // connects first when this process has no connection yet
    struct timespec dl;
    deadline_in(&dl, PEER_WAIT_MS);
    pthread_mutex_lock(&mu);
    struct lookup *l = &lookups[slot];
    while (!l->done && channel_up()) {
        if (pthread_cond_timedwait(&peer_cv, &mu, &dl) == ETIMEDOUT)
            break;
    }
    int have = l->done;
    if (have)
        *out = l->peer;
    l->used = 0;
    pthread_mutex_unlock(&mu);
    if (!have)
        dbg("no peer for socket %llu (source port %u)", socket, sport);
    return have;
}

// Converts the original client address to the accepted socket's family (IPv4 into AF_INET6 as
// ::ffff:a.b.c.d). Returns the length, or 0 when it cannot be represented.
static socklen_t peer_for_family(const struct sockaddr_storage *orig, int family,
                                 struct sockaddr_storage *out) {
    memset(out, 0, sizeof *out);
    if (orig->ss_family == family) {
        *out = *orig;
        return family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    }
    if (orig->ss_family == AF_INET && family == AF_INET6) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)orig;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)out;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = s4->sin_port;
        s6->sin6_addr.s6_addr[10] = 0xff;
        s6->sin6_addr.s6_addr[11] = 0xff;
        memcpy(&s6->sin6_addr.s6_addr[12], &s4->sin_addr, 4);
        return sizeof(struct sockaddr_in6);
    }
    if (orig->ss_family == AF_INET6 && family == AF_INET) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)orig;
        if (!IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
            return 0;
        struct sockaddr_in *s4 = (struct sockaddr_in *)out;
        s4->sin_family = AF_INET;
        s4->sin_port = s6->sin6_port;
        memcpy(&s4->sin_addr, &s6->sin6_addr.s6_addr[12], 4);
        return sizeof(struct sockaddr_in);
    }
    return 0;
}

// Copies a sockaddr into the caller's buffer the way the kernel does: truncated to *addrlen,
// and *addrlen set to the full length.
static void copy_out(struct sockaddr *addr, socklen_t *addrlen, const void *ss, socklen_t len) {
    if (!addr || !addrlen)
        return;
    socklen_t n = *addrlen < len ? *addrlen : len;
    memcpy(addr, ss, n);
    *addrlen = len;
}

// ---- hooks ----

// The kernel just handed out fd: whatever the tables say about that number is stale (its last
// close went around the hooks, e.g. close_range). Forget it; a listener it was is gone.
static void forget_stale(int fd) {
    if (fd < 0 || fd >= FD_MAX || !__atomic_load_n(&fd_map[fd], __ATOMIC_RELAXED))
        return;
    pthread_mutex_lock(&mu);
    uint16_t port = fd_detach(fd);
    pthread_mutex_unlock(&mu);
    if (port)
        report_close(port);
}

EXPORT int socket(int domain, int type, int protocol) {
    init();
    int fd = CALL_REAL(socket, domain, type, protocol);
    if (fd >= 0) {
        int saved = errno;
        forget_stale(fd);
        errno = saved;
    }
    return fd;
}

// Decision: the bind fallback only happens under mirrord: MIRRORD_LAYER_SOCKET set *and* the
// session reachable. Without a session the layer must be invisible, so a taken or privileged port
// fails exactly as it would unhooked.
EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    init();
    int rc = CALL_REAL(bind, fd, addr, len);
    if (rc == 0 || !layer_path || !addr || len < sizeof(sa_family_t))
        return rc;
    int err = errno;
    if ((err != EADDRINUSE && err != EACCES) ||
        (addr->sa_family != AF_INET && addr->sa_family != AF_INET6) || fd < 0 || fd >= FD_MAX ||
        !tcp_family(fd)) {
        errno = err;
        return rc;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    memcpy(&ss, addr, len < sizeof ss ? len : sizeof ss);
    uint16_t want = sa_port(&ss);
    // Only when the session is reachable: if it is gone, the app must see the real failure.
    pthread_mutex_lock(&send_mu);
    int up = ensure_connected() >= 0;
    pthread_mutex_unlock(&send_mu);
    if (want == 0 || !up) {
        errno = err;
        return rc;
    }
    sa_set_port(&ss, 0);
    if (CALL_REAL(bind, fd, (struct sockaddr *)&ss, len) != 0) {
        errno = err; // report the original failure
        return rc;
    }
    pthread_mutex_lock(&mu);
    int i = obj_get_or_new(fd);
    if (i >= 0)
        objs[i].req_port = want;
    pthread_mutex_unlock(&mu);
    dbg("bind to port %u failed (%s): bound an ephemeral port instead", want, strerror(err));
    return 0;
}

EXPORT int listen(int fd, int backlog) {
    init();
    int rc = CALL_REAL(listen, fd, backlog);
    if (rc != 0 || !layer_path)
        return rc;
    int saved = errno;
    int fam = tcp_family(fd);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (fam && fd < FD_MAX && CALL_REAL(getsockname, fd, (struct sockaddr *)&ss, &sl) == 0) {
        uint16_t local_port = sa_port(&ss);
        uint16_t port = local_port;
        int report = 0;
        pthread_mutex_lock(&mu);
        int i = obj_get_or_new(fd);
        if (i >= 0 && !objs[i].listening) {
            objs[i].listening = 1;
            objs[i].local_port = local_port;
            objs[i].family = fam == AF_INET ? 4 : 6;
            if (objs[i].req_port)
                port = objs[i].req_port;
            objs[i].reported = 1;
            report = 1;
        }
        pthread_mutex_unlock(&mu);
        if (report) {
            char a[INET6_ADDRSTRLEN];
            sa_addr_str(&ss, a, sizeof a);
            dbg("listen on port %u (local port %u)", port, local_port);
            report_listen(port, local_port, fam == AF_INET ? 4 : 6, a);
        }
    }
    errno = saved;
    return rc;
}

static int after_accept(int lfd, int fd, struct sockaddr *addr, socklen_t *addrlen) {
    if (fd < 0 || fd >= FD_MAX)
        return fd;
    int saved = errno;
    forget_stale(fd);
    if (!layer_path) {
        errno = saved;
        return fd;
    }
    // Listener state: a fallback-bound listener makes its connections lie about the local port.
    // Decision: the pushed peer serves a process that listens alone on the port and never forked
    // with the listener; any other (a pre-fork worker, one of several processes listening on
    // the port, a process handed the listener) asks.
    pthread_mutex_lock(&mu);
    int li = obj_of(lfd);
    uint16_t req_port = li >= 0 ? objs[li].req_port : 0;
    int pushed = li >= 0 && objs[li].listening && !objs[li].shared;
    pthread_mutex_unlock(&mu);

    struct sockaddr_storage orig;
    int have = 0, looked = 0;
    struct sockaddr_storage real;
    socklen_t rl = sizeof real;
    if (CALL_REAL(getpeername, fd, (struct sockaddr *)&real, &rl) == 0 &&
        sa_is_replay_source(&real) && tcp_family(fd)) {
        looked = 1;
        uint16_t sport = sa_port(&real), lport = local_port_of(fd);
        have = pushed ? wait_pushed(sport, lport, &orig) : lookup_peer(fd, sport, lport, &orig);
    }

    if (have || req_port || looked) {
        struct sockaddr_storage fake;
        socklen_t flen = 0;
        if (have) {
            flen = peer_for_family(&orig, addr && addr->sa_family ? addr->sa_family : AF_UNSPEC,
                                   &fake);
            if (!flen) {
                // addr may be NULL: use the socket's own family
                int fam = tcp_family(fd);
                flen = peer_for_family(&orig, fam, &fake);
            }
        }
        pthread_mutex_lock(&mu);
        int i = obj_get_or_new(fd);
        if (i >= 0) {
            objs[i].req_port = req_port;
            objs[i].peer_looked = (uint8_t)looked;
            if (flen) {
                objs[i].has_peer = 1;
                objs[i].peer = fake;
                objs[i].peer_len = flen;
            }
        }
        pthread_mutex_unlock(&mu);
        if (flen) {
            copy_out(addr, addrlen, &fake, flen);
            char a[INET6_ADDRSTRLEN];
            sa_addr_str(&fake, a, sizeof a);
            dbg("accepted fd %d: peer reported as %s:%u", fd, a, sa_port(&fake));
        }
    }
    errno = saved;
    return fd;
}

EXPORT int accept(int lfd, struct sockaddr *addr, socklen_t *addrlen) {
    init();
    int fd = CALL_REAL(accept, lfd, addr, addrlen);
    return after_accept(lfd, fd, addr, addrlen);
}

EXPORT int accept4(int lfd, struct sockaddr *addr, socklen_t *addrlen, int flags) {
    init();
    int fd = CALL_REAL(accept4, lfd, addr, addrlen, flags);
    return after_accept(lfd, fd, addr, addrlen);
}

EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    init();
    socklen_t cap = addrlen ? *addrlen : 0;
    int rc = CALL_REAL(getsockname, fd, addr, addrlen);
    if (rc != 0 || fd < 0 || fd >= FD_MAX || !__atomic_load_n(&fd_map[fd], __ATOMIC_RELAXED))
        return rc;
    pthread_mutex_lock(&mu);
    int i = obj_of(fd);
    uint16_t req = i >= 0 ? objs[i].req_port : 0;
    union inet_sockaddr target;
    socklen_t target_len = i >= 0 ? objs[i].out.local_len : 0;
    if (target_len)
        target = objs[i].out.local;
    pthread_mutex_unlock(&mu);
    // A connection through the target is bound where the agent's socket is, there.
    if (target_len) {
        *addrlen = cap;
        copy_out(addr, addrlen, &target, target_len);
        return rc;
    }
    // The port sits at the same offset (2..3) in sockaddr_in and sockaddr_in6.
    if (req && cap >= 4 && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
        uint16_t p = htons(req);
        memcpy((char *)addr + 2, &p, 2);
    }
    return rc;
}

// The original client of replayed connection fd, which this process did not accept (a Node
// cluster primary hands its workers the sockets it accepts): asked of the session, and
// remembered, found or not. Returns its length in *peer, 0 when unknown.
static socklen_t peer_of_handed(int fd, const struct sockaddr_storage *real,
                                struct sockaddr_storage *peer) {
    struct sockaddr_storage orig;
    socklen_t plen = 0;
    if (lookup_peer(fd, sa_port(real), local_port_of(fd), &orig))
        plen = peer_for_family(&orig, real->ss_family, peer);
    pthread_mutex_lock(&mu);
    int i = obj_get_or_new(fd);
    if (i >= 0) {
        objs[i].peer_looked = 1;
        if (plen) {
            objs[i].has_peer = 1;
            objs[i].peer = *peer;
            objs[i].peer_len = plen;
        }
    }
    pthread_mutex_unlock(&mu);
    return plen;
}

EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    init();
    if (!layer_path || fd < 0 || fd >= FD_MAX || !addr || !addrlen)
        return CALL_REAL(getpeername, fd, addr, addrlen);
    // Always ask the kernel, so a disconnected socket fails as it should (ENOTCONN).
    struct sockaddr_storage real;
    socklen_t rl = sizeof real;
    int rc = CALL_REAL(getpeername, fd, (struct sockaddr *)&real, &rl);
    if (rc != 0)
        return rc;
    struct sockaddr_storage peer;
    socklen_t plen = 0;
    int looked = 0;
    if (__atomic_load_n(&fd_map[fd], __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&mu);
        int i = obj_of(fd);
        union inet_sockaddr destination;
        socklen_t dlen;
        if (i >= 0) {
            looked = objs[i].peer_looked || objs[i].listening;
            if (objs[i].has_peer) {
                peer = objs[i].peer;
                plen = objs[i].peer_len;
            } else if (objs[i].out.family &&
                       (dlen = outgoing_destination(&objs[i].out, &real, &destination))) {
                // Connected to a relay of the session's: the destination it stands for.
                memcpy(&peer, &destination, dlen);
                plen = dlen;
            }
        }
        pthread_mutex_unlock(&mu);
    }
    // Decision: a replayed connection this process did not accept is looked up once; everything
    // else is the kernel's.
    if (!plen && !looked && sa_is_replay_source(&real) && tcp_family(fd))
        plen = peer_of_handed(fd, &real, &peer);
    if (plen)
        copy_out(addr, addrlen, &peer, plen);
    else
        copy_out(addr, addrlen, &real, rl);
    return 0;
}

static void before_close(int fd) {
    if (fd >= 0 && fd < FD_MAX && __atomic_load_n(&fd_map[fd], __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&mu);
        uint16_t port = fd_detach(fd);
        pthread_mutex_unlock(&mu);
        if (port) {
            dbg("listening socket for port %u closed", port);
            report_close(port);
        }
    }
}

EXPORT int close(int fd) {
    init();
    before_close(fd);
    return CALL_REAL(close, fd);
}

// fcntl(F_DUPFD / F_DUPFD_CLOEXEC) is a dup too (python's os.dup uses it). The third argument
// is read as a pointer-sized value, as glibc itself does, and forwarded unchanged.
static int fcntl_common(fcntl_fn f, int fd, int cmd, void *arg) {
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    int rc = f(fd, cmd, arg);
    if (rc >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) {
        int saved = errno;
        after_dup(fd, rc);
        errno = saved;
    }
    return rc;
}

EXPORT int fcntl(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    init();
    return fcntl_common(real_fcntl(), fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    init();
    fcntl_fn f = real_fcntl64();
    return fcntl_common(f ? f : real_fcntl(), fd, cmd, arg);
}

#if defined(__x86_64__) || defined(__aarch64__)
// libuv (hence node) closes fds with syscall(SYS_close, fd), bypassing close(). Forward every
// syscall() unchanged; only SYS_close is looked at. On these ABIs reading six variadic longs is
// safe whatever the caller passed (they come from registers / the caller's frame).
EXPORT long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long a1 = va_arg(ap, long), a2 = va_arg(ap, long), a3 = va_arg(ap, long);
    long a4 = va_arg(ap, long), a5 = va_arg(ap, long), a6 = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_close) {
        init();
        before_close((int)a1);
    }
    long rc;
    if (number == SYS_statx &&
        files_statx((int)a1, (const char *)a2, (int)a3, (struct statx *)a5, &rc))
        return rc;
    syscall_fn f = real_syscall();
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(number, a1, a2, a3, a4, a5, a6);
}
#endif

// After newfd became a copy of oldfd: newfd's previous object loses a reference (the kernel
// closed it) and newfd joins oldfd's object.
static void after_dup(int oldfd, int newfd) {
    if (newfd < 0 || newfd == oldfd)
        return;
    int track_new = newfd < FD_MAX && __atomic_load_n(&fd_map[newfd], __ATOMIC_RELAXED);
    int track_old =
        oldfd >= 0 && oldfd < FD_MAX && __atomic_load_n(&fd_map[oldfd], __ATOMIC_RELAXED);
    if (!track_new && !track_old)
        return;
    uint16_t port = 0;
    pthread_mutex_lock(&mu);
    if (newfd < FD_MAX)
        port = fd_detach(newfd);
    int i = obj_of(oldfd);
    if (i >= 0)
        fd_attach(newfd, i);
    pthread_mutex_unlock(&mu);
    if (port)
        report_close(port);
}

EXPORT int dup(int oldfd) {
    init();
    int fd = CALL_REAL(dup, oldfd);
    if (fd >= 0) {
        int saved = errno;
        after_dup(oldfd, fd);
        errno = saved;
    }
    return fd;
}

EXPORT int dup2(int oldfd, int newfd) {
    init();
    int fd = CALL_REAL(dup2, oldfd, newfd);
    if (fd >= 0) {
        int saved = errno;
        after_dup(oldfd, fd);
        errno = saved;
    }
    return fd;
}

EXPORT int dup3(int oldfd, int newfd, int flags) {
    init();
    int fd = CALL_REAL(dup3, oldfd, newfd, flags);
    if (fd >= 0) {
        int saved = errno;
        after_dup(oldfd, fd);
        errno = saved;
    }
    return fd;
}
