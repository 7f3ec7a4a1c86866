// Resolves names as the target resolves them: from inside its network namespace, with its own
// /etc/hosts and /etc/resolv.conf (nameservers, search domains, ndots). The agent starts it
// (src/features/outgoing/resolver.ts) as `mirrord_resolver --pid PID` or `--netns NAME` and
// asks getaddrinfo questions on stdin, one a line:
//   ID FAMILY NAME               (FAMILY 0, 4 or 6)
// and gets one answer a line on stdout, in the order the look-ups end:
//   ID ok CANON|- ADDR...        (getaddrinfo's order, each address once)
//   ID err CODE                  (the EAI name without EAI_: NONAME, AGAIN, FAIL...)
// A program rather than a thread of the agent: entering a mount namespace and a root is for a
// whole single-threaded process, and getaddrinfo blocks.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <nss.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <unistd.h>

// Look-ups at once. Each waits on a nameserver rather than on the CPU, so a slow one must not
// hold up the others; more than this wait for a slot.
#define MAX_IN_FLIGHT 64

// Guards in_flight and stdout, so that every answer is written whole.
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slot_freed = PTHREAD_COND_INITIALIZER;
static int in_flight;

struct query {
    unsigned long long id;
    int family;
    char name[];
};

// A failure to start: one line naming what failed (the agent reports it), exit code 2.
static _Noreturn void die(const char *format, ...) {
    int error = errno;
    va_list args;
    va_start(args, format);
    fputs("mirrord_resolver: ", stderr);
    vfprintf(stderr, format, args);
    va_end(args);
    fprintf(stderr, ": %s\n", strerror(error));
    exit(2);
}

// The same for an argument that is not what it should be.
static _Noreturn void refuse(const char *what, const char *argument) {
    fprintf(stderr, "mirrord_resolver: not a %s: %s\n", what, argument);
    exit(2);
}

static int open_or_die(const char *path, int flags) {
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        die("cannot open %s", path);
    return fd;
}

static void enter_pid(const char *pid) {
    char path[64];
    size_t digits = strspn(pid, "0123456789");
    if (!digits || digits > 10 || pid[digits])
        refuse("pid", pid);
    // All three are opened first: once in the target's mount namespace, /proc may not be there.
    snprintf(path, sizeof path, "/proc/%s/ns/net", pid);
    int net = open_or_die(path, O_RDONLY);
    snprintf(path, sizeof path, "/proc/%s/ns/mnt", pid);
    int mnt = open_or_die(path, O_RDONLY);
    snprintf(path, sizeof path, "/proc/%s/root", pid);
    int root = open_or_die(path, O_RDONLY | O_DIRECTORY);
    if (setns(net, CLONE_NEWNET) != 0)
        die("cannot enter the network namespace of pid %s", pid);
    if (setns(mnt, CLONE_NEWNS) != 0)
        die("cannot enter the mount namespace of pid %s", pid);
    // setns puts us at the root of the mount namespace; a target chrooted inside it reads its
    // /etc from its own root, so that is where we go.
    if (fchdir(root) != 0 || chroot(".") != 0 || chdir("/") != 0)
        die("cannot enter the root of pid %s", pid);
    close(net);
    close(mnt);
    close(root);
}

// What `ip netns exec NAME` does, for files: a program run that way reads /etc/netns/NAME/X as
// /etc/X, through bind mounts in a mount namespace of its own.
static void enter_netns(const char *name) {
    if (!*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, "..") ||
        strlen(name) >= NAME_MAX)
        refuse("netns name", name);
    char netns_path[sizeof "/run/netns/" + NAME_MAX];
    snprintf(netns_path, sizeof netns_path, "/run/netns/%s", name);
    int net = open_or_die(netns_path, O_RDONLY);
    if (setns(net, CLONE_NEWNET) != 0)
        die("cannot enter the network namespace %s", name);
    close(net);

    char dir_path[sizeof "/etc/netns/" + NAME_MAX];
    snprintf(dir_path, sizeof dir_path, "/etc/netns/%s", name);
    DIR *dir = opendir(dir_path);
    if (!dir) {
        if (errno == ENOENT)
            return;
        die("cannot open %s", dir_path);
    }
    if (unshare(CLONE_NEWNS) != 0)
        die("cannot make a mount namespace");
    // Slave, so the bind mounts stay ours while the host's later mounts still reach us.
    if (mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL) != 0)
        die("cannot make / a slave mount");
    for (struct dirent *entry; (entry = readdir(dir));) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, ".."))
            continue;
        char path[sizeof dir_path + sizeof entry->d_name], etc_path[sizeof "/etc/" + NAME_MAX];
        snprintf(path, sizeof path, "%s/%s", dir_path, entry->d_name);
        snprintf(etc_path, sizeof etc_path, "/etc/%s", entry->d_name);
        // ip netns exec warns and goes on (a file with no counterpart in /etc): so does the
        // target it started, so we see what it sees.
        if (mount(path, etc_path, NULL, MS_BIND, NULL) != 0)
            fprintf(stderr, "mirrord_resolver: cannot bind %s over %s: %s\n", path, etc_path,
                    strerror(errno));
    }
    closedir(dir);
}

static const char *eai_name(int code) {
    switch (code) {
    case EAI_NONAME:
        return "NONAME";
    case EAI_AGAIN:
        return "AGAIN";
    case EAI_FAIL:
        return "FAIL";
    case EAI_NODATA:
        return "NODATA";
    case EAI_FAMILY:
        return "FAMILY";
    case EAI_ADDRFAMILY:
        return "ADDRFAMILY";
    case EAI_MEMORY:
        return "MEMORY";
    case EAI_SYSTEM:
        return "SYSTEM";
    default:
        return "OTHER";
    }
}

static void address_text(const struct addrinfo *node, char *text) {
    const void *address = node->ai_family == AF_INET6
                              ? (const void *)&((struct sockaddr_in6 *)node->ai_addr)->sin6_addr
                              : (const void *)&((struct sockaddr_in *)node->ai_addr)->sin_addr;
    inet_ntop(node->ai_family, address, text, INET6_ADDRSTRLEN);
}

// Called with the lock held.
static void write_answer(const struct query *query, int code, const struct addrinfo *results) {
    if (code != 0) {
        printf("%llu err %s\n", query->id, eai_name(code));
        return;
    }
    const char *canon = results->ai_canonname;
    printf("%llu ok %s", query->id, canon && *canon ? canon : "-");
    char text[INET6_ADDRSTRLEN], seen_text[INET6_ADDRSTRLEN];
    for (const struct addrinfo *node = results; node; node = node->ai_next) {
        address_text(node, text);
        const struct addrinfo *seen = results;
        for (; seen != node; seen = seen->ai_next) {
            address_text(seen, seen_text);
            if (!strcmp(text, seen_text))
                break;
        }
        if (seen == node)
            printf(" %s", text);
    }
    putchar('\n');
}

// A look-up on its own thread. It returns rather than calling pthread_exit, which would unwind
// through libgcc_s: a library loaded on first use, from what is now the target's file system.
static void *resolve(void *arg) {
    struct query *query = arg;
    struct addrinfo hints = {
        .ai_family = query->family, .ai_socktype = SOCK_STREAM, .ai_flags = AI_CANONNAME};
    struct addrinfo *results = NULL;
    int code = getaddrinfo(query->name, NULL, &hints, &results);
    pthread_mutex_lock(&lock);
    write_answer(query, code, results);
    fflush(stdout);
    in_flight--;
    pthread_cond_signal(&slot_freed);
    pthread_mutex_unlock(&lock);
    if (results)
        freeaddrinfo(results);
    free(query);
    return NULL;
}

// `ID FAMILY NAME`; NULL (and a line on stderr) for a line that has no id to answer to.
static struct query *parse(const char *line) {
    char *end;
    errno = 0;
    unsigned long long id = strtoull(line, &end, 10);
    if (!isdigit((unsigned char)*line) || errno || *end != ' ') {
        fprintf(stderr, "mirrord_resolver: not a query: %s\n", line);
        return NULL;
    }
    const char *name = end + 1;
    int family = -1;
    if (name[0] && name[1] == ' ') {
        family = name[0] == '0'   ? AF_UNSPEC
                 : name[0] == '4' ? AF_INET
                 : name[0] == '6' ? AF_INET6
                                  : -1;
        name += 2;
    }
    struct query *query = malloc(sizeof *query + strlen(name) + 1);
    if (!query) {
        perror("mirrord_resolver");
        exit(1);
    }
    query->id = id;
    query->family = family;
    strcpy(query->name, name);
    return query;
}

int main(int argc, char **argv) {
    // Never outlive the agent. A parent that died before prctl is seen here; one that died
    // even before we ran closed our stdin with it, which ends us below.
    pid_t parent = getppid();
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
        die("cannot set PR_SET_PDEATHSIG");
    if (getppid() != parent)
        return 0;
    if (argc != 3 || (strcmp(argv[1], "--pid") && strcmp(argv[1], "--netns"))) {
        fputs("usage: mirrord_resolver --pid PID | --netns NAME\n", stderr);
        return 2;
    }
    // The target's nsswitch.conf may name modules (mdns, sss, resolve) that glibc would load
    // from the target's file system into this process: a build for another libc, unsafe. files
    // and dns are built into glibc >= 2.34, so they read the target's /etc/hosts and resolv.conf
    // without loading anything. Set before entering, so the target's nsswitch.conf is not read.
    if (__nss_configure_lookup("hosts", "files dns") != 0)
        die("cannot configure the hosts look-up");
    if (!strcmp(argv[1], "--pid"))
        enter_pid(argv[2]);
    else
        enter_netns(argv[2]);

    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    char *line = NULL;
    size_t size = 0;
    ssize_t length;
    while ((length = getline(&line, &size, stdin)) >= 0) {
        if (length > 0 && line[length - 1] == '\n')
            line[length - 1] = '\0';
        struct query *query = parse(line);
        if (!query)
            continue;
        pthread_mutex_lock(&lock);
        // Answered at once: a bad family, or a name with spaces (never a host name, and a
        // nameserver would be asked for it).
        int code = query->family < 0 ? EAI_FAMILY : strchr(query->name, ' ') ? EAI_NONAME : 0;
        while (!code && in_flight >= MAX_IN_FLIGHT)
            pthread_cond_wait(&slot_freed, &lock);
        pthread_t thread;
        if (!code && pthread_create(&thread, &detached, resolve, query) == 0) {
            in_flight++;
            pthread_mutex_unlock(&lock);
            continue;
        }
        // No thread to be had is a temporary failure, as EAI_AGAIN means.
        write_answer(query, code ? code : EAI_AGAIN, NULL);
        fflush(stdout);
        pthread_mutex_unlock(&lock);
        free(query);
    }
    // End of input: the look-ups under way still answer, so that a caller that closes its end
    // after its last query (a shell pipe) gets every answer. A dead agent cannot wait for them
    // to end (PR_SET_PDEATHSIG), nor read them (a write kills us with SIGPIPE).
    pthread_mutex_lock(&lock);
    while (in_flight > 0)
        pthread_cond_wait(&slot_freed, &lock);
    pthread_mutex_unlock(&lock);
    return 0;
}
