// The files feature in the app: its calls on the target's paths are answered from the target
// (src/features/files/), the others go to the local file system as if the layer were not there.
//
// One decision per call (remote_path, with the directories' section below): with
// MIRRORD_FS=read, an absolute path is the target's unless a glob keeps it local.
//
// A remote file that is opened becomes a memfd holding its contents, so read, pread, lseek,
// mmap and fstat need no hooks. Opened for writing, it is the app's private copy: writes never
// reach the target. stat, lstat, statx and access answer from the target's stat; readlink
// from its link. A call that gets no answer in FILE_WAIT_MS, or whose session is gone, fails
// with EIO: the app is never hung. A remote directory the app opens or lists is a local
// stand-in holding the target's names (see the directories' section).

#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "channel.h"

#define EXPORT __attribute__((visibility("default")))
#define FILE_WAIT_MS 10000
#define REQUESTS_MAX 64
#define GLOBS_MAX 256

static int files_on;
static char stand_ins_root[PATH_MAX]; // "" when the session gave none
static const char *local_globs[GLOBS_MAX];
static const char *remote_globs[GLOBS_MAX];

// A call waiting for the session's answer.
struct request {
    int used;
    int done;
    uint32_t id;
    int error;     // errno, 0 when served
    int memfd;     // open: where the contents go
    uint64_t size; // open: the bytes to come
    uint64_t received;
    uint64_t stat[13]; // see LayerStat in src/session/layer-messages.ts
    int have_stat;
    char text[PATH_MAX]; // readlink
    size_t text_len;
};

static pthread_mutex_t files_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t files_cv;
static struct request requests[REQUESTS_MAX];
static uint32_t next_id = 1;

// The globs, copied out of the environment: no malloc here, since init can run inside the
// app's allocator (jemalloc calls syscall(), which initialises the layer, from within malloc).
static char globs_text[2][32 * 1024];

static void split_globs(const char *value, char *text, size_t room, const char **out) {
    if (!value || !*value)
        return;
    size_t length = strlen(value);
    if (length >= room) {
        dbg("more globs than fit (%zu bytes): the last are ignored", length);
        length = room - 1;
    }
    memcpy(text, value, length);
    text[length] = 0;
    int n = 0;
    for (char *save = NULL, *glob = strtok_r(text, "\n", &save); glob && n < GLOBS_MAX - 1;
         glob = strtok_r(NULL, "\n", &save))
        out[n++] = glob;
    out[n] = NULL;
}

void files_init(void) {
    const char *mode = getenv("MIRRORD_FS");
    files_on = mode && strcmp(mode, "read") == 0 && getenv("MIRRORD_LAYER_SOCKET");
    if (!files_on)
        return;
    split_globs(getenv("MIRRORD_FS_LOCAL"), globs_text[0], sizeof globs_text[0], local_globs);
    split_globs(getenv("MIRRORD_FS_REMOTE"), globs_text[1], sizeof globs_text[1], remote_globs);
    // Beside the session's socket: made by the CLI (src/features/files/layer.ts), removed with it.
    const char *socket = getenv("MIRRORD_LAYER_SOCKET");
    const char *slash = strrchr(socket, '/');
    if (slash && (size_t)(slash - socket) + sizeof "/dirs" < sizeof stand_ins_root)
        snprintf(stand_ins_root, sizeof stand_ins_root, "%.*s/dirs", (int)(slash - socket), socket);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&files_cv, &ca);
    pthread_condattr_destroy(&ca);
}

void files_after_fork_child(void) {
    pthread_mutex_init(&files_mu, NULL);
    memset(requests, 0, sizeof requests);
}

static int matches(const char **globs, const char *path) {
    for (int i = 0; globs[i]; i++) {
        if (fnmatch(globs[i], path, 0) == 0)
            return 1;
    }
    return 0;
}

static const char *remote_path(int dirfd, const char *path, char *buf);
static const char *stand_in_of(int dirfd, char *buf);
static int stand_in(const char *path, char *out);

// ---- requests ----

static struct request *request_new(int memfd) {
    struct request *r = NULL;
    pthread_mutex_lock(&files_mu);
    for (int i = 0; i < REQUESTS_MAX && !r; i++) {
        if (!requests[i].used) {
            r = &requests[i];
            memset(r, 0, sizeof *r);
            r->used = 1;
            r->id = next_id++;
            r->memfd = memfd;
        }
    }
    pthread_mutex_unlock(&files_mu);
    return r;
}

// Sends the call and waits for its answer; 0, or -1 with errno (EIO when none came).
static int ask(struct request *r, const char *op, const char *path) {
    struct frame f;
    frame_begin(&f, LAYER_FILE, 3);
    msgpack_pack_uint32(&f.pk, r->id);
    pack_str(&f, op);
    pack_str(&f, path);
    send_frame(&f);
    struct timespec deadline;
    deadline_in(&deadline, FILE_WAIT_MS);
    pthread_mutex_lock(&files_mu);
    while (!r->done && channel_up()) {
        if (pthread_cond_timedwait(&files_cv, &files_mu, &deadline) == ETIMEDOUT)
            break;
    }
    int done = r->done, error = r->error;
    pthread_mutex_unlock(&files_mu);
    if (!done) {
        dbg("no answer for %s %s", op, path);
        errno = EIO;
        return -1;
    }
    if (error) {
        errno = error;
        return -1;
    }
    return 0;
}

static void request_free(struct request *r) {
    pthread_mutex_lock(&files_mu);
    r->used = 0;
    pthread_mutex_unlock(&files_mu);
}

static struct request *request_by_id(uint64_t id) {
    for (int i = 0; i < REQUESTS_MAX; i++) {
        if (requests[i].used && requests[i].id == id)
            return &requests[i];
    }
    return NULL;
}

// Called by the channel's reader thread: fileReply [code, id, errno|nil, stat|nil, size,
// text|nil] and fileData [code, id, offset, bytes].
void files_on_message(uint64_t code, const msgpack_object *f, uint32_t count) {
    pthread_mutex_lock(&files_mu);
    struct request *r = count > 1 && f[1].type == MSGPACK_OBJECT_POSITIVE_INTEGER
                            ? request_by_id(f[1].via.u64)
                            : NULL;
    if (!r || r->done) {
        pthread_mutex_unlock(&files_mu);
        return; // an answer that came too late
    }
    if (code == SESSION_FILE_REPLY && count == 6) {
        if (f[2].type == MSGPACK_OBJECT_STR) {
            r->error = errno_named(&f[2]);
        } else {
            if (f[3].type == MSGPACK_OBJECT_ARRAY && f[3].via.array.size == 13) {
                for (int i = 0; i < 13; i++)
                    r->stat[i] = f[3].via.array.ptr[i].via.u64;
                r->have_stat = 1;
            }
            if (f[4].type == MSGPACK_OBJECT_POSITIVE_INTEGER)
                r->size = f[4].via.u64;
            if (f[5].type == MSGPACK_OBJECT_STR && f[5].via.str.size < sizeof r->text) {
                memcpy(r->text, f[5].via.str.ptr, f[5].via.str.size);
                r->text_len = f[5].via.str.size;
            }
        }
        r->done = r->error != 0 || r->size == 0;
    } else if (code == SESSION_FILE_DATA && count == 4 && r->memfd >= 0 &&
               f[2].type == MSGPACK_OBJECT_POSITIVE_INTEGER && f[3].type == MSGPACK_OBJECT_BIN) {
        const char *bytes = f[3].via.bin.ptr;
        size_t left = f[3].via.bin.size;
        off_t at = (off_t)f[2].via.u64;
        while (left > 0) {
            ssize_t n = pwrite(r->memfd, bytes, left, at);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                r->error = EIO;
                break;
            }
            bytes += n;
            left -= (size_t)n;
            at += n;
        }
        r->received += f[3].via.bin.size;
        // An empty piece is the end, before `size` when the file shrank meanwhile.
        r->done = r->error != 0 || r->received >= r->size || f[3].via.bin.size == 0;
    }
    if (r->done)
        pthread_cond_broadcast(&files_cv);
    pthread_mutex_unlock(&files_mu);
}

// ---- the calls ----

static void fill_stat(const struct request *r, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_mode = (mode_t)r->stat[0];
    st->st_size = (off_t)r->stat[1];
    st->st_uid = (uid_t)r->stat[2];
    st->st_gid = (gid_t)r->stat[3];
    st->st_ino = (ino_t)r->stat[4];
    st->st_nlink = (nlink_t)r->stat[5];
    st->st_dev = (dev_t)r->stat[6];
    st->st_atim.tv_sec = (time_t)r->stat[7];
    st->st_atim.tv_nsec = (long)r->stat[8];
    st->st_mtim.tv_sec = (time_t)r->stat[9];
    st->st_mtim.tv_nsec = (long)r->stat[10];
    st->st_ctim.tv_sec = (time_t)r->stat[11];
    st->st_ctim.tv_nsec = (long)r->stat[12];
    st->st_blksize = 4096;
    st->st_blocks = (blkcnt_t)((r->stat[1] + 511) / 512);
}

static int remote_stat(const char *path, int follow, struct stat *st) {
    struct request *r = request_new(-1);
    if (!r) {
        errno = EAGAIN;
        return -1;
    }
    int rc = ask(r, follow ? "stat" : "lstat", path);
    if (rc == 0)
        fill_stat(r, st);
    request_free(r);
    return rc;
}

typedef int (*openat_fn)(int, const char *, int, ...);
static void *real_openat_slot, *real_openat64_slot, *real_open_slot, *real_open64_slot;

// A descriptor of the target's directory: its stand-in's.
static int open_stand_in(const char *path, int flags) {
    char dir[PATH_MAX];
    if (stand_in(path, dir) != 0)
        return -1;
    openat_fn real = (openat_fn)real_symbol(&real_openat_slot, "openat");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(AT_FDCWD, dir, flags);
}

// The target's file as a memfd of its contents: sealed against writes when opened for reading,
// the app's private copy when opened for writing; a directory as its stand-in.
static int remote_open(const char *path, int flags) {
    if (flags & O_DIRECTORY)
        return open_stand_in(path, flags);
    int writing = (flags & O_ACCMODE) != O_RDONLY;
    const char *name = strrchr(path, '/');
    int memfd = memfd_create(name && name[1] ? name + 1 : "mirrord",
                             MFD_ALLOW_SEALING | ((flags & O_CLOEXEC) ? MFD_CLOEXEC : 0));
    if (memfd < 0)
        return -1;
    if (writing && (flags & O_TRUNC))
        return memfd; // its old contents do not matter
    struct request *r = request_new(memfd);
    if (!r) {
        close(memfd);
        errno = EAGAIN;
        return -1;
    }
    int rc = ask(r, "open", path);
    int error = errno;
    unsigned long long size = r->size;
    request_free(r);
    if (rc != 0 && !(writing && (flags & O_CREAT) && error == ENOENT)) {
        close(memfd);
        // open(2) gives a directory to a reader that did not say O_DIRECTORY (Python's fwalk).
        if (error == EISDIR && !writing)
            return open_stand_in(path, flags);
        errno = error;
        return -1;
    }
    if (writing) {
        if (flags & O_APPEND)
            fcntl(memfd, F_SETFL, O_APPEND);
    } else {
        fcntl(memfd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL);
    }
    dbg("open %s: the target's, %llu bytes", path, size);
    return memfd;
}

static int open_hook(void **slot, const char *name, int dirfd, const char *path, int flags,
                     mode_t mode, int at) {
    char buf[PATH_MAX];
    const char *remote = remote_path(dirfd, path, buf);
    if (remote)
        return remote_open(remote, flags);
    void *real = real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    if (at)
        return ((openat_fn)real)(dirfd, path, flags, mode);
    return ((int (*)(const char *, int, ...))real)(path, flags, mode);
}

#define MODE_ARG(flags)                                                                            \
    mode_t mode = 0;                                                                               \
    if ((flags) & (O_CREAT | __O_TMPFILE)) {                                                       \
        va_list ap;                                                                                \
        va_start(ap, flags);                                                                       \
        mode = va_arg(ap, mode_t);                                                                 \
        va_end(ap);                                                                                \
    }

EXPORT int open(const char *path, int flags, ...) {
    MODE_ARG(flags)
    return open_hook(&real_open_slot, "open", AT_FDCWD, path, flags, mode, 0);
}

EXPORT int open64(const char *path, int flags, ...) {
    MODE_ARG(flags)
    return open_hook(&real_open64_slot, "open64", AT_FDCWD, path, flags, mode, 0);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...) {
    MODE_ARG(flags)
    return open_hook(&real_openat_slot, "openat", dirfd, path, flags, mode, 1);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...) {
    MODE_ARG(flags)
    return open_hook(&real_openat64_slot, "openat64", dirfd, path, flags, mode, 1);
}

// What _FORTIFY_SOURCE makes of open and openat.
EXPORT int __open_2(const char *path, int flags) { return open64(path, flags); }
EXPORT int __open64_2(const char *path, int flags) { return open64(path, flags); }
EXPORT int __openat_2(int dirfd, const char *path, int flags) {
    return openat64(dirfd, path, flags);
}
EXPORT int __openat64_2(int dirfd, const char *path, int flags) {
    return openat64(dirfd, path, flags);
}

// fopen's mode as open's flags.
static int fopen_flags(const char *mode) {
    int flags = 0;
    switch (mode[0]) {
    case 'r':
        flags = O_RDONLY;
        break;
    case 'w':
        flags = O_WRONLY | O_CREAT | O_TRUNC;
        break;
    case 'a':
        flags = O_WRONLY | O_CREAT | O_APPEND;
        break;
    default:
        return -1;
    }
    for (const char *c = mode + 1; *c; c++) {
        if (*c == '+')
            flags = (flags & ~O_ACCMODE) | O_RDWR;
        else if (*c == 'e')
            flags |= O_CLOEXEC;
        else if (*c == 'x')
            flags |= O_EXCL;
    }
    return flags;
}

typedef FILE *(*fopen_fn)(const char *, const char *);
static void *real_fopen_slot, *real_fopen64_slot;

static FILE *fopen_hook(void **slot, const char *name, const char *path, const char *mode) {
    int flags = mode ? fopen_flags(mode) : -1;
    char buf[PATH_MAX];
    const char *remote = flags >= 0 ? remote_path(AT_FDCWD, path, buf) : NULL;
    if (remote) {
        int fd = remote_open(remote, flags);
        if (fd < 0)
            return NULL;
        FILE *file = fdopen(fd, mode);
        if (!file)
            close(fd);
        return file;
    }
    fopen_fn real = (fopen_fn)real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return NULL;
    }
    return real(path, mode);
}

EXPORT FILE *fopen(const char *path, const char *mode) {
    return fopen_hook(&real_fopen_slot, "fopen", path, mode);
}

EXPORT FILE *fopen64(const char *path, const char *mode) {
    return fopen_hook(&real_fopen64_slot, "fopen64", path, mode);
}

// ---- stat and its kin ----

typedef int (*fstatat_fn)(int, const char *, struct stat *, int);
static void *real_fstatat_slot, *real_fstatat64_slot, *real_stat_slot, *real_stat64_slot,
    *real_lstat_slot, *real_lstat64_slot;

// The target's path a stat-like call names: with AT_EMPTY_PATH and "", the descriptor's own
// (a stand-in's directory), else as remote_path says.
static const char *stat_path(int dirfd, const char *path, int flags, char *buf) {
    if (flags & AT_EMPTY_PATH && path && path[0] == 0)
        return stand_in_of(dirfd, buf);
    return remote_path(dirfd, path, buf);
}

static int stat_hook(void **slot, const char *name, int dirfd, const char *path, struct stat *st,
                     int flags, int at, int follow) {
    char buf[PATH_MAX];
    const char *remote = stat_path(dirfd, path, flags, buf);
    if (remote)
        return remote_stat(remote, follow && !(flags & AT_SYMLINK_NOFOLLOW), st);
    void *real = real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    if (at)
        return ((fstatat_fn)real)(dirfd, path, st, flags);
    return ((int (*)(const char *, struct stat *))real)(path, st);
}

EXPORT int stat(const char *path, struct stat *st) {
    return stat_hook(&real_stat_slot, "stat", AT_FDCWD, path, st, 0, 0, 1);
}
EXPORT int stat64(const char *path, struct stat64 *st) {
    return stat_hook(&real_stat64_slot, "stat64", AT_FDCWD, path, (struct stat *)st, 0, 0, 1);
}
EXPORT int lstat(const char *path, struct stat *st) {
    return stat_hook(&real_lstat_slot, "lstat", AT_FDCWD, path, st, 0, 0, 0);
}
EXPORT int lstat64(const char *path, struct stat64 *st) {
    return stat_hook(&real_lstat64_slot, "lstat64", AT_FDCWD, path, (struct stat *)st, 0, 0, 0);
}
EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags) {
    return stat_hook(&real_fstatat_slot, "fstatat", dirfd, path, st, flags, 1, 1);
}
EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags) {
    return stat_hook(&real_fstatat64_slot, "fstatat64", dirfd, path, (struct stat *)st, flags, 1,
                     1);
}

// Binaries built against glibc before 2.33 call these instead.
typedef int (*xstat_fn)(int, const char *, struct stat *);
static void *real_xstat_slot, *real_xstat64_slot, *real_lxstat_slot, *real_lxstat64_slot;

static int xstat_hook(void **slot, const char *name, int ver, const char *path, struct stat *st,
                      int follow) {
    char buf[PATH_MAX];
    const char *remote = remote_path(AT_FDCWD, path, buf);
    if (remote)
        return remote_stat(remote, follow, st);
    xstat_fn real = (xstat_fn)real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(ver, path, st);
}

EXPORT int __xstat(int ver, const char *path, struct stat *st) {
    return xstat_hook(&real_xstat_slot, "__xstat", ver, path, st, 1);
}
EXPORT int __xstat64(int ver, const char *path, struct stat64 *st) {
    return xstat_hook(&real_xstat64_slot, "__xstat64", ver, path, (struct stat *)st, 1);
}
EXPORT int __lxstat(int ver, const char *path, struct stat *st) {
    return xstat_hook(&real_lxstat_slot, "__lxstat", ver, path, st, 0);
}
EXPORT int __lxstat64(int ver, const char *path, struct stat64 *st) {
    return xstat_hook(&real_lxstat64_slot, "__lxstat64", ver, path, (struct stat *)st, 0);
}

// fstat on a stand-in gives the target's directory's stat, as a stat of its path does: a
// runtime that compares the two (Python's fwalk, against a directory swapped under it) finds
// them the same. Only a directory on the stand-ins' file system is asked about. `ver` is the
// pre-2.33 __fxstat's first argument, or -1 for fstat's form.
typedef int (*fstat_fn)(int, struct stat *);
typedef int (*fxstat_fn)(int, int, struct stat *);
static void *real_fstat_slot, *real_fstat64_slot, *real_fxstat_slot, *real_fxstat64_slot;

static int fstat_hook(void **slot, const char *name, int ver, int fd, struct stat *st) {
    void *real = real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    int rc = ver < 0 ? ((fstat_fn)real)(fd, st) : ((fxstat_fn)real)(ver, fd, st);
    if (rc != 0 || !files_on || !S_ISDIR(st->st_mode))
        return rc;
    static dev_t dev;
    struct stat root;
    if (dev == 0 && stand_ins_root[0] && stat(stand_ins_root, &root) == 0)
        dev = root.st_dev;
    char buf[PATH_MAX];
    const char *remote = st->st_dev == dev ? stand_in_of(fd, buf) : NULL;
    return remote ? remote_stat(remote, 1, st) : rc;
}

EXPORT int fstat(int fd, struct stat *st) {
    return fstat_hook(&real_fstat_slot, "fstat", -1, fd, st);
}
EXPORT int fstat64(int fd, struct stat64 *st) {
    return fstat_hook(&real_fstat64_slot, "fstat64", -1, fd, (struct stat *)st);
}
EXPORT int __fxstat(int ver, int fd, struct stat *st) {
    return fstat_hook(&real_fxstat_slot, "__fxstat", ver, fd, st);
}
EXPORT int __fxstat64(int ver, int fd, struct stat64 *st) {
    return fstat_hook(&real_fxstat64_slot, "__fxstat64", ver, fd, (struct stat *)st);
}

static void fill_statx(const struct stat *st, struct statx *sx) {
    memset(sx, 0, sizeof *sx);
    sx->stx_mask = STATX_BASIC_STATS;
    sx->stx_blksize = (uint32_t)st->st_blksize;
    sx->stx_nlink = (uint32_t)st->st_nlink;
    sx->stx_uid = st->st_uid;
    sx->stx_gid = st->st_gid;
    sx->stx_mode = (uint16_t)st->st_mode;
    sx->stx_ino = st->st_ino;
    sx->stx_size = (uint64_t)st->st_size;
    sx->stx_blocks = (uint64_t)st->st_blocks;
    sx->stx_atime.tv_sec = st->st_atim.tv_sec;
    sx->stx_atime.tv_nsec = (uint32_t)st->st_atim.tv_nsec;
    sx->stx_mtime.tv_sec = st->st_mtim.tv_sec;
    sx->stx_mtime.tv_nsec = (uint32_t)st->st_mtim.tv_nsec;
    sx->stx_ctime.tv_sec = st->st_ctim.tv_sec;
    sx->stx_ctime.tv_nsec = (uint32_t)st->st_ctim.tv_nsec;
    sx->stx_dev_major = major(st->st_dev);
    sx->stx_dev_minor = minor(st->st_dev);
}

// statx for a remote path: 1 when answered (rc in *rc), 0 when the path is local.
int files_statx(int dirfd, const char *path, int flags, struct statx *sx, long *rc) {
    char buf[PATH_MAX];
    const char *remote = stat_path(dirfd, path, flags, buf);
    if (!remote)
        return 0;
    struct stat st;
    *rc = remote_stat(remote, !(flags & AT_SYMLINK_NOFOLLOW), &st);
    if (*rc == 0)
        fill_statx(&st, sx);
    return 1;
}

typedef int (*statx_fn)(int, const char *, int, unsigned int, struct statx *);
static void *real_statx_slot;

EXPORT int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *sx) {
    long rc;
    if (files_statx(dirfd, path, flags, sx, &rc))
        return (int)rc;
    statx_fn real = (statx_fn)real_symbol(&real_statx_slot, "statx");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(dirfd, path, flags, mask, sx);
}

// ---- access and readlink ----

static int remote_access(const char *path, int mode) {
    struct stat st;
    if (remote_stat(path, 1, &st) != 0)
        return -1;
    // The target's files are readable through the agent, and writable as the app's private
    // copy; executable as their mode says.
    if ((mode & X_OK) && !(st.st_mode & 0111)) {
        errno = EACCES;
        return -1;
    }
    return 0;
}

typedef int (*access_fn)(const char *, int);
typedef int (*faccessat_fn)(int, const char *, int, int);
static void *real_access_slot, *real_faccessat_slot;

EXPORT int access(const char *path, int mode) {
    char buf[PATH_MAX];
    const char *remote = remote_path(AT_FDCWD, path, buf);
    if (remote)
        return remote_access(remote, mode);
    access_fn real = (access_fn)real_symbol(&real_access_slot, "access");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(path, mode);
}

EXPORT int faccessat(int dirfd, const char *path, int mode, int flags) {
    char buf[PATH_MAX];
    const char *remote = remote_path(dirfd, path, buf);
    if (remote)
        return remote_access(remote, mode);
    faccessat_fn real = (faccessat_fn)real_symbol(&real_faccessat_slot, "faccessat");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(dirfd, path, mode, flags);
}

static ssize_t remote_readlink(const char *path, char *buf, size_t size) {
    struct request *r = request_new(-1);
    if (!r) {
        errno = EAGAIN;
        return -1;
    }
    ssize_t rc = ask(r, "readlink", path);
    if (rc == 0) {
        rc = (ssize_t)(r->text_len < size ? r->text_len : size);
        memcpy(buf, r->text, (size_t)rc); // readlink(2) does not terminate it either
    }
    request_free(r);
    return rc;
}

typedef ssize_t (*readlink_fn)(const char *, char *, size_t);
typedef ssize_t (*readlinkat_fn)(int, const char *, char *, size_t);
static void *real_readlink_slot, *real_readlinkat_slot;

EXPORT ssize_t readlink(const char *path, char *buf, size_t size) {
    char at[PATH_MAX];
    const char *remote = remote_path(AT_FDCWD, path, at);
    if (remote)
        return remote_readlink(remote, buf, size);
    readlink_fn real = (readlink_fn)real_symbol(&real_readlink_slot, "readlink");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(path, buf, size);
}

EXPORT ssize_t readlinkat(int dirfd, const char *path, char *buf, size_t size) {
    char at[PATH_MAX];
    const char *remote = remote_path(dirfd, path, at);
    if (remote)
        return remote_readlink(remote, buf, size);
    readlinkat_fn real = (readlinkat_fn)real_symbol(&real_readlinkat_slot, "readlinkat");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(dirfd, path, buf, size);
}

// ---- extended attributes: the target's files have none (ls -l asks for ACLs) ----

typedef ssize_t (*getxattr_fn)(const char *, const char *, void *, size_t);
typedef ssize_t (*listxattr_fn)(const char *, char *, size_t);
static void *real_getxattr_slot, *real_lgetxattr_slot, *real_listxattr_slot, *real_llistxattr_slot;

static ssize_t getxattr_hook(void **slot, const char *name, const char *path, const char *key,
                             void *value, size_t size) {
    char buf[PATH_MAX];
    if (remote_path(AT_FDCWD, path, buf)) {
        errno = ENODATA;
        return -1;
    }
    getxattr_fn real = (getxattr_fn)real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(path, key, value, size);
}

static ssize_t listxattr_hook(void **slot, const char *name, const char *path, char *list,
                              size_t size) {
    char buf[PATH_MAX];
    if (remote_path(AT_FDCWD, path, buf))
        return 0;
    listxattr_fn real = (listxattr_fn)real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(path, list, size);
}

EXPORT ssize_t getxattr(const char *path, const char *key, void *value, size_t size) {
    return getxattr_hook(&real_getxattr_slot, "getxattr", path, key, value, size);
}
EXPORT ssize_t lgetxattr(const char *path, const char *key, void *value, size_t size) {
    return getxattr_hook(&real_lgetxattr_slot, "lgetxattr", path, key, value, size);
}
EXPORT ssize_t listxattr(const char *path, char *list, size_t size) {
    return listxattr_hook(&real_listxattr_slot, "listxattr", path, list, size);
}
EXPORT ssize_t llistxattr(const char *path, char *list, size_t size) {
    return listxattr_hook(&real_llistxattr_slot, "llistxattr", path, list, size);
}

// ---- directories: a local stand-in for each of the target's that the app opens ----
//
// The app gets a real directory whose entries are the target's names, each of the target's kind
// and empty: opendir, readdir, scandir, fdopendir, getdents64 and fstat on it are the kernel's
// and glibc's own, as many ways of listing as runtimes have, with no hook. A call on a name from
// such a directory (openat, fstatat, readlinkat with its descriptor) is the target's: see
// remote_path. The stand-ins live in the session's directory (src/features/files/layer.ts),
// which the CLI removes at the end; one tree per process and user, refreshed from the target at
// every open.

typedef int (*scandir_fn)(const char *, struct dirent ***, int (*)(const struct dirent *),
                          int (*)(const struct dirent **, const struct dirent **));
typedef DIR *(*opendir_fn)(const char *);
static void *real_scandir_slot, *real_scandir64_slot, *real_opendir_slot;

// The target's directory that `dirfd` is a stand-in of, into buf ("/" for the root), or NULL.
// Asked of the kernel, so that dup'd and inherited descriptors are recognised too.
static const char *stand_in_of(int dirfd, char *buf) {
    size_t root_len = strlen(stand_ins_root);
    if (dirfd < 0 || root_len == 0)
        return NULL;
    char proc[32], target[PATH_MAX];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", dirfd);
    readlinkat_fn real = (readlinkat_fn)real_symbol(&real_readlinkat_slot, "readlinkat");
    ssize_t n = real ? real(AT_FDCWD, proc, target, sizeof target - 1) : -1;
    if (n <= (ssize_t)root_len || memcmp(target, stand_ins_root, root_len) != 0 ||
        target[root_len] != '/')
        return NULL;
    target[n] = 0;
    const char *tree = strchr(target + root_len + 1, '/'); // past the process's tree
    snprintf(buf, PATH_MAX, "%s", tree ? tree : "/");
    return buf;
}

// The one decision: the target's path a call names, or NULL when the call is local. An
// absolute path is the target's unless it matches a glob of MIRRORD_FS_LOCAL (the defaults and
// --fs-local, from src/features/files/policy.ts), and one of MIRRORD_FS_REMOTE (--fs-remote)
// makes it the target's again (fnmatch(3) globs without FNM_PATHNAME: `*` crosses `/`). A
// relative one is the app's own, from its working directory, unless it is from a stand-in's
// descriptor: then it is the target's, built into buf.
static const char *remote_path(int dirfd, const char *path, char *buf) {
    if (!files_on || !path)
        return NULL;
    if (path[0] == '/') {
        size_t root_len = strlen(stand_ins_root);
        if (root_len && strncmp(path, stand_ins_root, root_len) == 0)
            return NULL; // a stand-in named by its own path
        if (matches(remote_globs, path))
            return path;
        return matches(local_globs, path) ? NULL : path;
    }
    if (dirfd == AT_FDCWD || path[0] == 0 || !stand_in_of(dirfd, buf))
        return NULL;
    size_t len = strlen(buf);
    if (snprintf(buf + len, PATH_MAX - len, "%s%s", len > 1 ? "/" : "", path) >=
        (int)(PATH_MAX - len))
        return NULL;
    return buf;
}

// The target's listing of `path`: a kind letter, the name and a NUL each, in malloc'd memory.
static char *remote_list(const char *path, size_t *size) {
    int memfd = memfd_create("mirrord-dir", MFD_CLOEXEC);
    if (memfd < 0)
        return NULL;
    struct request *r = request_new(memfd);
    if (!r) {
        close(memfd);
        errno = EAGAIN;
        return NULL;
    }
    int rc = ask(r, "list", path);
    int error = errno;
    *size = (size_t)r->size;
    request_free(r);
    char *entries = rc == 0 ? malloc(*size ? *size : 1) : NULL;
    if (entries && pread(memfd, entries, *size, 0) != (ssize_t)*size) {
        free(entries);
        entries = NULL;
        error = EIO;
    } else if (rc == 0 && !entries) {
        error = ENOMEM;
    }
    close(memfd);
    errno = error;
    return entries;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)ftw;
    return flag == FTW_DP ? rmdir(path) : unlink(path);
}

static unsigned char kind_type(char kind) {
    return kind == 'd' ? DT_DIR : kind == 'l' ? DT_LNK : DT_REG;
}

static int by_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a + 1, *(const char *const *)b + 1);
}

// The kind of the entry `name` of `dir` as kind_type gives it, asking lstat when the file system
// does not say (d_type DT_UNKNOWN).
static unsigned char entry_type(const char *dir, const struct dirent *e) {
    if (e->d_type != DT_UNKNOWN)
        return e->d_type == DT_DIR || e->d_type == DT_LNK ? e->d_type : DT_REG;
    char path[PATH_MAX];
    struct stat st;
    if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path ||
        lstat(path, &st) != 0)
        return DT_UNKNOWN;
    return S_ISDIR(st.st_mode) ? DT_DIR : S_ISLNK(st.st_mode) ? DT_LNK : DT_REG;
}

// Makes `dir` hold exactly the names of `entries`, each of its kind: what is there already
// stays (a stand-in below it may be open), the rest is removed or made. The listing is sorted
// by name first, so that a directory of many entries costs n log n, not n².
static void sync_entries(const char *dir, const char *entries, size_t size) {
    size_t count = 0;
    for (size_t at = 0; at < size; at += strlen(entries + at + 1) + 2)
        count++;
    const char **sorted = malloc((count ? count : 1) * sizeof *sorted);
    if (!sorted)
        return;
    count = 0;
    for (size_t at = 0; at < size; at += strlen(entries + at + 1) + 2)
        sorted[count++] = entries + at; // the kind letter, then the name
    qsort(sorted, count, sizeof *sorted, by_name);

    char path[PATH_MAX];
    struct dirent **have = NULL;
    scandir_fn real_scandir = (scandir_fn)real_symbol(&real_scandir_slot, "scandir");
    int present = real_scandir ? real_scandir(dir, &have, NULL, NULL) : -1;
    for (int i = 0; i < present; i++) {
        const char *name = have[i]->d_name;
        char key[NAME_MAX + 2];
        snprintf(key, sizeof key, "?%s", name);
        const char *wanted = key;
        const char **found = bsearch(&wanted, sorted, count, sizeof *sorted, by_name);
        int keep = strcmp(name, ".") == 0 || strcmp(name, "..") == 0 ||
                   (found && kind_type(**found) == entry_type(dir, have[i]));
        if (!keep && snprintf(path, sizeof path, "%s/%s", dir, name) < (int)sizeof path)
            nftw(path, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
        free(have[i]);
    }
    free(have);
    for (size_t i = 0; i < count; i++) {
        if (snprintf(path, sizeof path, "%s/%s", dir, sorted[i] + 1) >= (int)sizeof path)
            continue;
        if (sorted[i][0] == 'd')
            mkdir(path, 0755);
        else if (sorted[i][0] == 'l')
            symlink("(the target's)", path); // readlinkat through the stand-in asks the target
        else
            mknod(path, S_IFREG | 0644, 0);
    }
    free(sorted);
}

// The stand-in of the target's directory `path` (made or refreshed now) into `out`; -1 with
// errno as the target's (ENOENT, ENOTDIR, EACCES…) or EIO.
static int stand_in(const char *path, char *out) {
    if (!stand_ins_root[0]) {
        errno = ENOTSUP;
        return -1;
    }
    size_t size;
    char *entries = remote_list(path, &size);
    if (!entries)
        return -1;
    // The process's tree, then the path's components as the target's: `.` and `..` taken here
    // (they must not lead out of the tree), the others made as directories on the way.
    int len = snprintf(out, PATH_MAX, "%s/%d.%d", stand_ins_root, (int)getpid(), (int)getuid());
    const int tree_len = len;
    mkdir(out, 0700);
    for (const char *c = path; *c && len < PATH_MAX; c += strcspn(c, "/")) {
        c += strspn(c, "/");
        int n = (int)strcspn(c, "/");
        if (n == 0 || (n == 1 && c[0] == '.'))
            continue;
        if (n == 2 && c[0] == '.' && c[1] == '.') {
            while (len > tree_len && out[--len] != '/') {
            }
            out[len] = 0;
            continue;
        }
        len += snprintf(out + len, PATH_MAX - (size_t)len, "/%.*s", n, c);
        struct stat st;
        if (len < PATH_MAX && mkdir(out, 0755) != 0 && errno == EEXIST && lstat(out, &st) == 0 &&
            !S_ISDIR(st.st_mode)) {
            unlink(out); // the stand-in of a file the target had here before
            mkdir(out, 0755);
        }
    }
    if (len >= PATH_MAX) {
        free(entries);
        errno = ENAMETOOLONG;
        return -1;
    }
    sync_entries(out, entries, size);
    free(entries);
    return 0;
}

EXPORT DIR *opendir(const char *path) {
    char buf[PATH_MAX], dir[PATH_MAX];
    const char *remote = remote_path(AT_FDCWD, path, buf);
    if (remote && stand_in(remote, dir) != 0)
        return NULL;
    opendir_fn real = (opendir_fn)real_symbol(&real_opendir_slot, "opendir");
    if (!real) {
        errno = ENOSYS;
        return NULL;
    }
    return real(remote ? dir : path);
}

// libuv lists directories with scandir, whose own opendir is glibc's, not the one above.
static int scandir_hook(void **slot, const char *name, const char *path, struct dirent ***out,
                        int (*filter)(const struct dirent *),
                        int (*compar)(const struct dirent **, const struct dirent **)) {
    char buf[PATH_MAX], dir[PATH_MAX];
    const char *remote = remote_path(AT_FDCWD, path, buf);
    if (remote && stand_in(remote, dir) != 0)
        return -1;
    scandir_fn real = (scandir_fn)real_symbol(slot, name);
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(remote ? dir : path, out, filter, compar);
}

EXPORT int scandir(const char *path, struct dirent ***out, int (*filter)(const struct dirent *),
                   int (*compar)(const struct dirent **, const struct dirent **)) {
    return scandir_hook(&real_scandir_slot, "scandir", path, out, filter, compar);
}

EXPORT int scandir64(const char *path, struct dirent64 ***out,
                     int (*filter)(const struct dirent64 *),
                     int (*compar)(const struct dirent64 **, const struct dirent64 **)) {
    return scandir_hook(&real_scandir64_slot, "scandir64", path, (struct dirent ***)out,
                        (int (*)(const struct dirent *))filter,
                        (int (*)(const struct dirent **, const struct dirent **))compar);
}
