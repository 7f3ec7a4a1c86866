// mirrord-guard: the local app's parent, so that nothing the app starts outlives mirrord.
//
//   mirrord-guard -- COMMAND [ARGS...]     (fd 3: a pipe or socket whose other end only the
//                                           mirrord process that started the guard holds)
//
// Runs COMMAND as its child and exits as it does (same code, or killed by the same signal).
// While mirrord runs, the guard only passes SIGTERM on to COMMAND and, on SIGUSR1 (mirrord gave
// up waiting), SIGKILLs COMMAND and every process below it. When fd 3 hangs up, mirrord died
// without stopping the app (kill -9, a crash): the guard SIGTERMs every process below it, waits
// up to 5 s, SIGKILLs what is left, and exits.
//
// Why a separate process rather than the layer ending its own process when its channel to the
// CLI closes, or PR_SET_PDEATHSIG alone:
//  - the layer is not in every process of the app: not in a static binary, not in a child
//    started with a clean environment, and it connects only once a process listens or accepts,
//    so an idle pre-fork worker has no channel to lose;
//  - PR_SET_PDEATHSIG covers one process, not its workers, and fires when the parent *thread*
//    ends, so it cannot be set for the app's own children (a worker forked from a short-lived
//    thread would die with the thread);
//  - as a child subreaper (PR_SET_CHILD_SUBREAPER) the guard inherits every orphan of the app,
//    daemonized ones included, so "every process below the guard" is the app's whole tree,
//    whatever process groups or sessions it made.
// The app itself gets PR_SET_PDEATHSIG(SIGKILL) towards the guard, which is single-threaded, so
// even a SIGKILLed guard does not leave the app's main process behind.
//
// Signals the terminal sends to the whole foreground process group (SIGINT, SIGQUIT, SIGHUP)
// reach the app directly: the guard ignores them instead of passing on a second copy. It is
// linked statically, so the LD_PRELOAD it passes on to the app does not load into it.

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CLI_FD 3
// As long as mirrord itself gives the app after SIGTERM (src/session/mirror.ts).
#define GRACE_MS 5000

static pid_t app;
static const char *app_name;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// The parent of process `pid` from /proc/PID/stat, or -1 when it is gone.
static pid_t parent_of(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, the last ')' ends it.
    char *p = strrchr(buf, ')');
    int ppid;
    if (!p || sscanf(p + 1, " %*c %d", &ppid) != 1)
        return -1;
    return ppid;
}

// Sends `sig` to every process below the guard.
static void signal_tree(int sig) {
    size_t cap = 256, len = 0;
    pid_t *pids = malloc(cap * sizeof *pids), *parents = malloc(cap * sizeof *parents);
    DIR *d = opendir("/proc");
    if (!pids || !parents || !d) {
        // Cannot list processes: at least the app's main process.
        free(pids);
        free(parents);
        if (d)
            closedir(d);
        kill(app, sig);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0)
            continue;
        pid_t ppid = parent_of((pid_t)pid);
        if (ppid <= 0)
            continue;
        if (len == cap) {
            cap *= 2;
            pid_t *p = realloc(pids, cap * sizeof *pids), *q = realloc(parents, cap * sizeof *q);
            if (p)
                pids = p;
            if (q)
                parents = q;
            if (!p || !q)
                break;
        }
        pids[len] = (pid_t)pid;
        parents[len] = ppid;
        len++;
    }
    closedir(d);
    // Marks descendants in passes: a process is below the guard if its parent is the guard or a
    // marked process. Each pass marks at least one more level, so it ends.
    char *below = calloc(len ? len : 1, 1);
    if (below) {
        pid_t self = getpid();
        for (int changed = 1; changed;) {
            changed = 0;
            for (size_t i = 0; i < len; i++) {
                if (below[i])
                    continue;
                int mine = parents[i] == self;
                for (size_t j = 0; !mine && j < len; j++)
                    mine = below[j] && pids[j] == parents[i];
                if (mine) {
                    below[i] = 1;
                    changed = 1;
                }
            }
        }
        for (size_t i = 0; i < len; i++) {
            if (below[i])
                kill(pids[i], sig);
        }
        free(below);
    } else {
        kill(app, sig);
    }
    free(pids);
    free(parents);
}

// Ends the guard the way the app ended, so that mirrord sees the app's own status.
static void exit_like(int status) {
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        // No core file of the guard for the app's crash.
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        signal(sig, SIG_DFL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        raise(sig);
        _exit(128 + sig);
    }
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}

// Reaps every child that ended (the app, and orphans of the app handed to the subreaper).
// Returns 1 once the guard has no child left.
static int reap(int *app_status, int *app_done) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid == 0)
            return 0;
        if (pid < 0)
            return errno == ECHILD;
        if (pid == app) {
            *app_status = status;
            *app_done = 1;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3 || strcmp(argv[1], "--") != 0) {
        fprintf(stderr, "usage: mirrord-guard -- COMMAND [ARGS...] (run by mirrord)\n");
        return 2;
    }
    app_name = argv[2];
    if (fcntl(CLI_FD, F_SETFD, FD_CLOEXEC) != 0) {
        fprintf(stderr, "mirrord-guard: fd %d is not open (run by mirrord)\n", CLI_FD);
        return 2;
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    // Its last words to a CLI that is gone go to a broken pipe: dying of SIGPIPE there would
    // leave the app running, which is what the guard is for.
    signal(SIGPIPE, SIG_IGN);

    sigset_t handled, original;
    sigemptyset(&handled);
    int sigs[] = {SIGCHLD, SIGTERM, SIGUSR1, SIGINT, SIGQUIT, SIGHUP};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
        sigaddset(&handled, sigs[i]);
    sigprocmask(SIG_BLOCK, &handled, &original);
    int sfd = signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
    int exec_pipe[2];
    if (sfd < 0 || pipe2(exec_pipe, O_CLOEXEC) != 0) {
        perror("mirrord-guard");
        return 1;
    }

    pid_t guard = getpid();
    app = fork();
    if (app < 0) {
        perror("mirrord-guard: fork");
        return 1;
    }
    if (app == 0) {
        // The app starts with the signal mask mirrord gave the guard, and dies with the guard.
        sigprocmask(SIG_SETMASK, &original, NULL);
        // An ignored signal stays ignored across exec: the app gets the default back.
        signal(SIGPIPE, SIG_DFL);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != guard)
            _exit(1);
        execvp(argv[2], argv + 2);
        int err = errno;
        ssize_t ignored = write(exec_pipe[1], &err, sizeof err);
        (void)ignored;
        _exit(127);
    }
    close(exec_pipe[1]);
    int err;
    ssize_t got;
    do
        got = read(exec_pipe[0], &err, sizeof err);
    while (got < 0 && errno == EINTR);
    close(exec_pipe[0]);
    if (got == sizeof err) {
        // mirrord words it; the child has nothing to clean up.
        waitpid(app, NULL, 0);
        dprintf(CLI_FD, "exec failed: %s: %s\n", strerrorname_np(err), strerror(err));
        return err == ENOENT ? 127 : 126;
    }

    int app_status = 0, app_done = 0;
    long long deadline = -1; // set once mirrord is gone
    struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN}, {.fd = CLI_FD, .events = 0}};
    for (;;) {
        int timeout = -1;
        if (deadline >= 0) {
            long long left = deadline - now_ms();
            timeout = left > 0 ? (int)left : 0;
        }
        int n = poll(fds, 2, timeout);
        if (n < 0 && errno != EINTR)
            break;
        if (n == 0 && deadline >= 0) {
            // The grace is over: whatever still runs is killed; reaping goes on until none is left.
            signal_tree(SIGKILL);
            deadline = now_ms() + 1000;
            continue;
        }
        if (fds[1].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            // mirrord is gone without stopping the app.
            fds[1].fd = -1;
            dprintf(2, "mirrord-guard: mirrord is gone: stopping %s (pid %d) and its processes\n",
                    app_name, (int)app);
            signal_tree(SIGTERM);
            deadline = now_ms() + GRACE_MS;
        }
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si) {
                if (si.ssi_signo == SIGTERM && !app_done)
                    kill(app, SIGTERM);
                else if (si.ssi_signo == SIGUSR1)
                    signal_tree(SIGKILL);
                if (si.ssi_signo != SIGCHLD)
                    continue;
                int none_left = reap(&app_status, &app_done);
                // While mirrord runs, the app's end is the guard's; once mirrord is gone, the
                // guard stays until the last process below it ended.
                if (app_done && (deadline < 0 || none_left))
                    exit_like(app_status);
                if (none_left)
                    _exit(1);
            }
        }
    }
    return 1;
}
