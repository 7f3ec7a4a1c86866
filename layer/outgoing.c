// The outgoing feature in the app: its TCP connections, UDP datagrams and name look-ups leave
// from the target's network namespace (src/features/outgoing/); the others go as if the layer
// were not there.
//
// One decision per call (goes_remote): with MIRRORD_OUTGOING=remote, a destination or a name is
// the target's unless a rule keeps it local: those of MIRRORD_OUTGOING_LOCAL, and loopback with
// MIRRORD_OUTGOING_LOCALHOST=local.
//
// A TCP connect to the target's asks the session (LAYER_CONNECT), whose agent connects there;
// the app's socket then really connects to the session's relay on loopback, which the session
// joins to the agent's socket. So the app holds a real connected socket: blocking or not, poll,
// epoll, half-close and backpressure are the kernel's own, and only connect, getpeername (the
// destination) and getsockname (the agent's socket in the target) need hooks. A UDP socket gets
// a relay per destination it sends to: what it sends there goes to that relay, and what comes
// from the relay is reported as coming from the destination. A name the target resolves
// (LAYER_RESOLVE) becomes glibc's own result for its addresses.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fnmatch.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "channel.h"

#define EXPORT __attribute__((visibility("default")))

// A connect waits as long as the agent's own connect in the target may take: Linux gives up
// after about two minutes (tcp_syn_retries 6: 127 s), and the agent answers ETIMEDOUT then.
#define CONNECT_WAIT_MS 150000
#define RESOLVE_WAIT_MS 20000
// 500 threads may connect at once; more wait for a slot.
#define REQUESTS_MAX 256
// As many as glibc's DNS back end takes from one answer.
#define ADDRESSES_MAX 48
#define RULES_MAX 256
#define LOCAL_ADDRESSES_MAX 256
// gethostbyname's result: two names, the addresses and their pointers.
#define HOSTENT_ROOM (2 * NI_MAXHOST + ADDRESSES_MAX * (16 + sizeof(char *)) + 8 * sizeof(char *))

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*name_fn)(int, struct sockaddr *, socklen_t *);
typedef ssize_t (*sendto_fn)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
typedef ssize_t (*sendmsg_fn)(int, const struct msghdr *, int);
typedef int (*sendmmsg_fn)(int, struct mmsghdr *, unsigned int, int);
typedef ssize_t (*recvfrom_fn)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
typedef ssize_t (*recvfrom_chk_fn)(int, void *, size_t, size_t, int, struct sockaddr *,
                                   socklen_t *);
typedef ssize_t (*recvmsg_fn)(int, struct msghdr *, int);
typedef int (*recvmmsg_fn)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *,
                              struct addrinfo **);
typedef struct hostent *(*gethostbyname_fn)(const char *);
typedef struct hostent *(*gethostbyname2_fn)(const char *, int);
typedef int (*gethostbyname_r_fn)(const char *, struct hostent *, char *, size_t, struct hostent **,
                                  int *);
typedef int (*gethostbyname2_r_fn)(const char *, int, struct hostent *, char *, size_t,
                                   struct hostent **, int *);

REAL(bind_fn, bind)
REAL(connect_fn, connect)
REAL(name_fn, getsockname)
REAL(sendto_fn, sendto)
REAL(sendmsg_fn, sendmsg)
REAL(sendmmsg_fn, sendmmsg)
REAL(recvfrom_fn, recvfrom)
REAL(recvfrom_chk_fn, __recvfrom_chk)
REAL(recvmsg_fn, recvmsg)
REAL(recvmmsg_fn, recvmmsg)
REAL(getaddrinfo_fn, getaddrinfo)
REAL(gethostbyname_fn, gethostbyname)
REAL(gethostbyname2_fn, gethostbyname2)
REAL(gethostbyname_r_fn, gethostbyname_r)
REAL(gethostbyname2_r_fn, gethostbyname2_r)

// ---- settings ----

static int outgoing_on;     // MIRRORD_OUTGOING=remote
static int localhost_local; // MIRRORD_OUTGOING_LOCALHOST=local

// An address as the decision and the session see it: a v4-mapped IPv6 address is the IPv4 one.
struct address {
    int family; // 4 or 6
    uint8_t bytes[16];
};

// A rule of MIRRORD_OUTGOING_LOCAL: destinations and names it matches stay local.
struct rule {
    const char *host; // a name pattern (fnmatch, any case); NULL for an address rule
    struct address address;
    int prefix;
    uint16_t port; // 0: every port
};
static struct rule rules[RULES_MAX];
static int rules_count;
// The rules' text, copied out of the environment: no malloc in init (see files_init).
static char rules_text[16 * 1024];

// out_mu guards the requests and the local addresses. Never held with layer.c's locks.
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

// The addresses names of local rules resolved to here: connections to them stay local too, for
// the rule's port. The oldest is forgotten first.
struct local_address {
    int used;
    struct address address;
    uint16_t port; // 0: every port
};
static struct local_address local_addresses[LOCAL_ADDRESSES_MAX];
static int local_addresses_next;

// ---- addresses ----

static void address_of_in6(const struct in6_addr *a, struct address *out) {
    memset(out, 0, sizeof *out);
    if (IN6_IS_ADDR_V4MAPPED(a)) {
        out->family = 4;
        memcpy(out->bytes, &a->s6_addr[12], 4);
    } else {
        out->family = 6;
        memcpy(out->bytes, a, 16);
    }
}

// The address and port of an AF_INET or AF_INET6 sockaddr: 1, or 0 for another family.
static int address_of_sockaddr(const struct sockaddr *sa, struct address *out, uint16_t *port) {
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        memset(out, 0, sizeof *out);
        out->family = 4;
        memcpy(out->bytes, &s4->sin_addr, 4);
        *port = ntohs(s4->sin_port);
        return 1;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        address_of_in6(&s6->sin6_addr, out);
        *port = ntohs(s6->sin6_port);
        return 1;
    }
    return 0;
}

static int address_parse(const char *text, struct address *out) {
    struct in6_addr a6;
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, text, out->bytes) == 1) {
        out->family = 4;
        return 1;
    }
    if (inet_pton(AF_INET6, text, &a6) == 1) {
        address_of_in6(&a6, out);
        return 1;
    }
    return 0;
}

static void address_text(const struct address *a, char *out, size_t n) {
    inet_ntop(a->family == 4 ? AF_INET : AF_INET6, a->bytes, out, (socklen_t)n);
}

// a at port as a sockaddr of a socket of family (an IPv4 address v4-mapped on an IPv6 socket):
// its length, 0 when that family cannot hold it.
static socklen_t sockaddr_of(const struct address *a, uint16_t port, int family,
                             union inet_sockaddr *out) {
    memset(out, 0, sizeof *out);
    if (family == AF_INET) {
        if (a->family != 4)
            return 0;
        out->v4.sin_family = AF_INET;
        out->v4.sin_port = htons(port);
        memcpy(&out->v4.sin_addr, a->bytes, 4);
        return sizeof out->v4;
    }
    out->v6.sin6_family = AF_INET6;
    out->v6.sin6_port = htons(port);
    if (a->family == 4) {
        out->v6.sin6_addr.s6_addr[10] = 0xff;
        out->v6.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&out->v6.sin6_addr.s6_addr[12], a->bytes, 4);
    } else {
        memcpy(&out->v6.sin6_addr, a->bytes, 16);
    }
    return sizeof out->v6;
}

static const struct address loopback4 = {4, {127, 0, 0, 1}};
static const struct address loopback6 = {6, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}};

// Loopback, or unspecified (which connect takes for this host).
static int is_loopback(const struct address *a) {
    static const uint8_t zero[16];
    if (a->family == 4)
        return a->bytes[0] == 127 || memcmp(a->bytes, zero, 4) == 0;
    return memcmp(a->bytes, zero, 15) == 0 && a->bytes[15] <= 1;
}

static int in_prefix(const struct address *a, const struct rule *r) {
    if (a->family != r->address.family)
        return 0;
    int whole = r->prefix / 8, bits = r->prefix % 8;
    if (memcmp(a->bytes, r->address.bytes, (size_t)whole) != 0)
        return 0;
    return bits == 0 || ((a->bytes[whole] ^ r->address.bytes[whole]) & (0xff00 >> bits)) == 0;
}

// ---- names ----

// Whether node is an address, which glibc takes as itself without looking anything up: IPv4 in
// inet_aton's forms too, IPv6 with a scope too.
static int is_numeric(const char *node) {
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_aton(node, &a4))
        return 1;
    char text[INET6_ADDRSTRLEN];
    size_t n = strcspn(node, "%");
    if (n >= sizeof text)
        return 0;
    memcpy(text, node, n);
    text[n] = 0;
    return inet_pton(AF_INET6, text, &a6) == 1;
}

// name without the final dot of a fully qualified one, into out; 0 when it does not fit.
static int bare_name(const char *name, char *out, size_t room) {
    size_t n = strlen(name);
    if (n > 0 && name[n - 1] == '.')
        n--;
    if (n >= room)
        return 0;
    memcpy(out, name, n);
    out[n] = 0;
    return 1;
}

static int name_matches(const struct rule *r, const char *bare) {
    return r->host && fnmatch(r->host, bare, FNM_CASEFOLD) == 0;
}

// ---- the rules ----

static int port_parse(const char *text, uint16_t *port) {
    char *end;
    unsigned long p = strtoul(text, &end, 10);
    if (!*text || *end || p == 0 || p > 65535)
        return 0;
    *port = (uint16_t)p;
    return 1;
}

// ADDR[/PREFIX] into r.
static int cidr_parse(char *text, struct rule *r) {
    char *slash = strchr(text, '/');
    if (slash)
        *slash = 0;
    int ok = address_parse(text, &r->address);
    int full = r->address.family == 4 ? 32 : 128;
    r->prefix = full;
    if (ok && slash) {
        char *end;
        long prefix = strtol(slash + 1, &end, 10);
        ok = slash[1] && !*end && prefix >= 0 && prefix <= full;
        r->prefix = (int)prefix;
    }
    if (slash)
        *slash = '/';
    return ok;
}

// One rule: [V6ADDR[/PREFIX]][:PORT], ADDR[/PREFIX], ADDR[/PREFIX]:PORT, HOST or HOST:PORT (an
// IPv6 address with a port needs its brackets: a bare one is all address).
static int rule_parse(char *text, struct rule *r) {
    memset(r, 0, sizeof *r);
    if (text[0] == '[') {
        char *close = strchr(text, ']');
        if (!close || (close[1] && (close[1] != ':' || !port_parse(close + 2, &r->port))))
            return 0;
        *close = 0;
        return cidr_parse(text + 1, r);
    }
    if (cidr_parse(text, r))
        return 1;
    char *colon = strrchr(text, ':');
    if (colon && port_parse(colon + 1, &r->port)) {
        *colon = 0;
        if (cidr_parse(text, r))
            return 1;
    }
    r->host = text;
    return text[0] && !strchr(text, '/') && !strchr(text, ':');
}

static void rules_parse(const char *value) {
    if (!value || !*value)
        return;
    size_t length = strlen(value);
    if (length >= sizeof rules_text) {
        dbg("more outgoing rules than fit (%zu bytes): the last are ignored", length);
        length = sizeof rules_text - 1;
    }
    memcpy(rules_text, value, length);
    rules_text[length] = 0;
    for (char *save = NULL, *line = strtok_r(rules_text, "\n", &save);
         line && rules_count < RULES_MAX; line = strtok_r(NULL, "\n", &save)) {
        line += strspn(line, " \t");
        line[strcspn(line, " \t\r")] = 0;
        if (!line[0])
            continue;
        if (rule_parse(line, &rules[rules_count]))
            rules_count++;
        else
            dbg("an outgoing rule that is none: %s", line);
    }
}

// ---- the decision ----

static int is_local_address(const struct address *a, uint16_t port);

// Where a call of the app's on an AF_INET or AF_INET6 TCP or UDP socket sends.
struct destination {
    int type;                  // SOCK_STREAM or SOCK_DGRAM
    int socket_family;         // AF_INET or AF_INET6
    union inet_sockaddr given; // as the app gave it
    struct address address;
    uint16_t port;
};

// The one decision: whether a call goes to the target (1) or stays local (0). It names either a
// name being resolved, `name`, or where it sends, `d`. Stay local: loopback (and the name
// localhost) with MIRRORD_OUTGOING_LOCALHOST=local; what a rule of MIRRORD_OUTGOING_LOCAL
// matches, an address rule by address and port, a name rule by name and, for connections, by
// the addresses the name resolved to here.
static int goes_remote(const char *name, const struct destination *d) {
    if (!outgoing_on)
        return 0;
    if (name) {
        char bare[NI_MAXHOST];
        if (!bare_name(name, bare, sizeof bare))
            return 1;
        if (localhost_local && strcasecmp(bare, "localhost") == 0)
            return 0;
        for (int i = 0; i < rules_count; i++) {
            if (name_matches(&rules[i], bare))
                return 0;
        }
        return 1;
    }
    if (localhost_local && is_loopback(&d->address))
        return 0;
    for (int i = 0; i < rules_count; i++) {
        const struct rule *r = &rules[i];
        if (!r->host && (r->port == 0 || r->port == d->port) && in_prefix(&d->address, r))
            return 0;
    }
    return !is_local_address(&d->address, d->port);
}

static int is_local_address(const struct address *a, uint16_t port) {
    int local = 0;
    pthread_mutex_lock(&out_mu);
    for (int i = 0; i < LOCAL_ADDRESSES_MAX && !local; i++) {
        const struct local_address *l = &local_addresses[i];
        local = l->used && (l->port == 0 || l->port == port) && l->address.family == a->family &&
                memcmp(l->address.bytes, a->bytes, 16) == 0;
    }
    pthread_mutex_unlock(&out_mu);
    return local;
}

// Remembers that a name resolved here to sa: a local destination for each name rule it matches.
static void remember_local(const char *name, const struct sockaddr *sa) {
    char bare[NI_MAXHOST];
    struct address a;
    uint16_t unused;
    if (!bare_name(name, bare, sizeof bare) || !address_of_sockaddr(sa, &a, &unused))
        return;
    for (int i = 0; i < rules_count; i++) {
        if (!name_matches(&rules[i], bare) || is_local_address(&a, rules[i].port))
            continue;
        pthread_mutex_lock(&out_mu);
        struct local_address *l = &local_addresses[local_addresses_next];
        local_addresses_next = (local_addresses_next + 1) % LOCAL_ADDRESSES_MAX;
        l->used = 1;
        l->address = a;
        l->port = rules[i].port;
        pthread_mutex_unlock(&out_mu);
    }
}

// What the decision makes of a name the app looks up: 1 the target resolves it, 0 it is
// resolved here, -1 it is no name (an address, or none) or the feature is off.
static int name_decision(const char *node) {
    if (!outgoing_on || !node || !*node || is_numeric(node))
        return -1;
    return goes_remote(node, NULL);
}

// SOCK_STREAM for a TCP socket, SOCK_DGRAM for a UDP one, of family AF_INET or AF_INET6 (into
// *family); else 0.
static int inet_socket(int fd, int *family) {
    int domain, type, protocol;
    socklen_t l = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l) != 0 ||
        (domain != AF_INET && domain != AF_INET6))
        return 0;
    l = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) != 0)
        return 0;
    l = sizeof protocol;
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &l) != 0)
        return 0;
    *family = domain;
    if ((type == SOCK_STREAM && protocol == IPPROTO_TCP) ||
        (type == SOCK_DGRAM && protocol == IPPROTO_UDP))
        return type;
    return 0;
}

// Where a call on fd sends, when it is the feature's: to an AF_INET or AF_INET6 address (of the
// socket's own family) and a port, from a TCP or UDP socket. 1 with *d, else 0.
static int destination_of(int fd, const struct sockaddr *addr, socklen_t len,
                          struct destination *d) {
    if (!outgoing_on || !addr)
        return 0;
    memset(d, 0, sizeof *d);
    if (addr->sa_family == AF_INET && len >= sizeof d->given.v4)
        memcpy(&d->given, addr, sizeof d->given.v4);
    else if (addr->sa_family == AF_INET6 && len >= sizeof d->given.v6)
        memcpy(&d->given, addr, sizeof d->given.v6);
    else
        return 0;
    address_of_sockaddr(&d->given.sa, &d->address, &d->port);
    if (d->port == 0)
        return 0;
    d->type = inet_socket(fd, &d->socket_family);
    return d->type && d->socket_family == addr->sa_family;
}

// ---- requests to the session ----

struct connected {
    int error; // an errno; 0 when connected
    uint16_t relay_port;
    int has_local;
    struct address local; // the agent's socket in the target
    uint16_t local_port;
};

struct resolved {
    int error;                  // an EAI_ code; 0 when resolved
    char canonical[NI_MAXHOST]; // "" when the target gave none
    int count;
    struct address addresses[ADDRESSES_MAX];
};

// A call waiting for the session's answer.
struct request {
    int used;
    int done;
    uint32_t id;
    int resolving; // which answer it waits for
    // Its own, so that an answer wakes its waiter alone, not the hundreds waiting with it.
    pthread_cond_t answered;
    struct connected connected;
    struct resolved resolved;
};

static struct request requests[REQUESTS_MAX];
static pthread_cond_t slots_cv; // a request came free
static uint32_t next_id = 1;

static void conds_init(void) {
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&slots_cv, &ca);
    for (int i = 0; i < REQUESTS_MAX; i++)
        pthread_cond_init(&requests[i].answered, &ca);
    pthread_condattr_destroy(&ca);
}

void outgoing_init(void) {
    const char *mode = getenv("MIRRORD_OUTGOING");
    outgoing_on = mode && strcmp(mode, "remote") == 0 && getenv("MIRRORD_LAYER_SOCKET");
    if (!outgoing_on)
        return;
    const char *localhost = getenv("MIRRORD_OUTGOING_LOCALHOST");
    localhost_local = localhost && strcmp(localhost, "local") == 0;
    rules_parse(getenv("MIRRORD_OUTGOING_LOCAL"));
    conds_init();
}

// The parent's waiters are not in the child, and its condition variables may count them: both
// start afresh.
void outgoing_after_fork_child(void) {
    pthread_mutex_init(&out_mu, NULL);
    if (!outgoing_on)
        return;
    memset(requests, 0, sizeof requests);
    conds_init();
}

void outgoing_on_channel_lost(void) {
    if (!outgoing_on)
        return;
    pthread_mutex_lock(&out_mu);
    for (int i = 0; i < REQUESTS_MAX; i++) {
        if (requests[i].used && !requests[i].done)
            pthread_cond_signal(&requests[i].answered);
    }
    pthread_mutex_unlock(&out_mu);
}

// A free request, waited for until the deadline when all are taken; NULL when none came free.
static struct request *request_new(int resolving, const struct timespec *deadline) {
    struct request *r = NULL;
    pthread_mutex_lock(&out_mu);
    for (;;) {
        for (int i = 0; i < REQUESTS_MAX && !r; i++) {
            if (!requests[i].used)
                r = &requests[i];
        }
        if (r || pthread_cond_timedwait(&slots_cv, &out_mu, deadline) == ETIMEDOUT)
            break;
    }
    if (r) {
        r->used = 1;
        r->done = 0;
        r->resolving = resolving;
        r->id = next_id++;
    }
    pthread_mutex_unlock(&out_mu);
    return r;
}

static void request_free(struct request *r) {
    pthread_mutex_lock(&out_mu);
    r->used = 0;
    pthread_cond_signal(&slots_cv);
    pthread_mutex_unlock(&out_mu);
}

// Sends f, r's question, and waits for the answer: 1 answered, 0 none by the deadline, -1 the
// channel is down (or went down: an answer can no longer come).
static int ask(struct request *r, struct frame *f, const struct timespec *deadline) {
    uint32_t generation = send_frame(f);
    int timed_out = 0;
    pthread_mutex_lock(&out_mu);
    while (!r->done && !timed_out && channel_alive(generation))
        timed_out = pthread_cond_timedwait(&r->answered, &out_mu, deadline) == ETIMEDOUT;
    int outcome = r->done ? 1 : timed_out ? 0 : -1;
    pthread_mutex_unlock(&out_mu);
    return outcome;
}

static int str_is(const msgpack_object *o, const char *name) {
    return o->via.str.size == strlen(name) && memcmp(o->via.str.ptr, name, o->via.str.size) == 0;
}

static int eai_of(const msgpack_object *o) {
    static const struct {
        const char *name;
        int value;
    } names[] = {
        {"NONAME", EAI_NONAME},   {"AGAIN", EAI_AGAIN},       {"FAIL", EAI_FAIL},
        {"NODATA", EAI_NODATA},   {"FAMILY", EAI_FAMILY},     {"ADDRFAMILY", EAI_ADDRFAMILY},
        {"SERVICE", EAI_SERVICE}, {"SOCKTYPE", EAI_SOCKTYPE}, {"BADFLAGS", EAI_BADFLAGS},
        {"MEMORY", EAI_MEMORY},   {"OVERFLOW", EAI_OVERFLOW}, {"SYSTEM", EAI_SYSTEM},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (str_is(o, names[i].name))
            return names[i].value;
    }
    return EAI_FAIL;
}

static int port_of(const msgpack_object *o, uint16_t *port) {
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > 65535)
        return 0;
    *port = (uint16_t)o->via.u64;
    return 1;
}

// connected [code, id, errno|nil, relayPort, localAddress|nil, localPort]. An answer that makes
// no sense fails the call (EIO) rather than leave it waiting.
static void read_connected(const msgpack_object *f, uint32_t count, struct connected *c) {
    memset(c, 0, sizeof *c);
    char local[INET6_ADDRSTRLEN];
    if (count == 6 && f[2].type == MSGPACK_OBJECT_STR)
        c->error = errno_named(&f[2]);
    else if (count != 6 || f[2].type != MSGPACK_OBJECT_NIL || !port_of(&f[3], &c->relay_port) ||
             c->relay_port == 0)
        c->error = EIO;
    else
        c->has_local = str_of(&f[4], local, sizeof local) == 0 && address_parse(local, &c->local) &&
                       port_of(&f[5], &c->local_port);
}

// resolved [code, id, error|nil, canonicalName|nil, addresses].
static void read_resolved(const msgpack_object *f, uint32_t count, struct resolved *r) {
    r->error = 0;
    r->canonical[0] = 0;
    r->count = 0;
    if (count != 5 || (f[2].type != MSGPACK_OBJECT_NIL && f[2].type != MSGPACK_OBJECT_STR)) {
        r->error = EAI_FAIL;
        return;
    }
    if (f[2].type == MSGPACK_OBJECT_STR) {
        r->error = eai_of(&f[2]);
        return;
    }
    if (str_of(&f[3], r->canonical, sizeof r->canonical) != 0)
        r->canonical[0] = 0;
    if (f[4].type != MSGPACK_OBJECT_ARRAY)
        return;
    for (uint32_t i = 0; i < f[4].via.array.size; i++) {
        char text[INET6_ADDRSTRLEN];
        if (r->count == ADDRESSES_MAX) {
            dbg("a name of more than %d addresses: the last are left out", ADDRESSES_MAX);
            break;
        }
        if (str_of(&f[4].via.array.ptr[i], text, sizeof text) == 0 &&
            address_parse(text, &r->addresses[r->count]))
            r->count++;
    }
}

// Called by the channel's reader thread.
void outgoing_on_message(uint64_t code, const msgpack_object *f, uint32_t count) {
    if (count < 2 || f[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return;
    pthread_mutex_lock(&out_mu);
    struct request *r = NULL;
    for (int i = 0; i < REQUESTS_MAX && !r; i++) {
        if (requests[i].used && requests[i].id == f[1].via.u64)
            r = &requests[i];
    }
    // Else an answer that came too late.
    if (r && !r->done && r->resolving == (code == SESSION_RESOLVED)) {
        if (r->resolving)
            read_resolved(f, count, &r->resolved);
        else
            read_connected(f, count, &r->connected);
        r->done = 1;
        pthread_cond_signal(&r->answered);
    }
    pthread_mutex_unlock(&out_mu);
}

// The text of the app socket's address as the session sees it: a v4-mapped one as IPv4 (the
// session's relay for IPv4 sees it so).
static void local_text(const struct sockaddr_storage *local, char *out, size_t n, uint16_t *port) {
    struct address a;
    out[0] = 0;
    if (address_of_sockaddr((const struct sockaddr *)local, &a, port))
        address_text(&a, out, n);
}

// Asks the session for a relay to d (proto "tcp" or "udp") for the app's socket bound at local:
// 0 with *c, or -1 with errno.
static int ask_connect(const char *proto, const struct destination *d,
                       const struct sockaddr_storage *local, struct connected *c) {
    struct timespec deadline;
    deadline_in(&deadline, CONNECT_WAIT_MS);
    char address[INET6_ADDRSTRLEN], local_address[INET6_ADDRSTRLEN];
    address_text(&d->address, address, sizeof address);
    uint16_t local_port;
    local_text(local, local_address, sizeof local_address, &local_port);
    int outcome = 0;
    struct request *r = request_new(0, &deadline);
    if (r) {
        struct frame f;
        frame_begin(&f, LAYER_CONNECT, 7);
        msgpack_pack_uint32(&f.pk, r->id);
        pack_str(&f, proto);
        msgpack_pack_int(&f.pk, d->address.family);
        pack_str(&f, address);
        msgpack_pack_uint16(&f.pk, d->port);
        pack_str(&f, local_address);
        msgpack_pack_uint16(&f.pk, local_port);
        outcome = ask(r, &f, &deadline);
        if (outcome == 1)
            *c = r->connected;
        request_free(r);
    }
    if (outcome == 1 && c->error == 0)
        return 0;
    if (outcome != 1)
        dbg("%s to %s:%u: %s", proto, address, d->port,
            outcome == 0 ? "no answer in time" : "the session is gone");
    errno = outcome == 1 ? c->error : outcome == 0 ? ETIMEDOUT : ENETUNREACH;
    return -1;
}

// The target's answer for name (family 0, 4 or 6) into *out: 0, or an EAI_ code.
static int resolve(const char *name, int family, struct resolved *out) {
    struct timespec deadline;
    deadline_in(&deadline, RESOLVE_WAIT_MS);
    int outcome = 0;
    struct request *r = request_new(1, &deadline);
    if (r) {
        struct frame f;
        frame_begin(&f, LAYER_RESOLVE, 3);
        msgpack_pack_uint32(&f.pk, r->id);
        pack_str(&f, name);
        msgpack_pack_int(&f.pk, family);
        outcome = ask(r, &f, &deadline);
        if (outcome == 1)
            *out = r->resolved;
        request_free(r);
    }
    if (outcome != 1) {
        dbg("look-up of %s: %s", name, outcome == 0 ? "no answer in time" : "the session is gone");
        return EAI_AGAIN;
    }
    return out->error;
}

// ---- relays ----

// Whether this machine has ::1 (a container without IPv6 has not). Without it the IPv4 relay
// takes IPv6 destinations too, through ::ffff:127.0.0.1, as the session's side does.
static int has_loopback6(void) {
    static int known; // 1 yes, 2 no, 0 not asked yet
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (!k) {
        union inet_sockaddr a;
        socklen_t len = sockaddr_of(&loopback6, 0, AF_INET6, &a);
        int s = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        k = s >= 0 && CALL_REAL(bind, s, &a.sa, len) == 0 ? 1 : 2;
        if (s >= 0)
            close(s);
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k == 1;
}

// The session's relay at port, as a socket of family reaches it: 127.0.0.1 (v4-mapped on an IPv6
// socket) or ::1.
static socklen_t relay_sockaddr(int family, int on_loopback6, uint16_t port,
                                union inet_sockaddr *out) {
    return sockaddr_of(on_loopback6 ? &loopback6 : &loopback4, port, family, out);
}

static int same_destination(const union inet_sockaddr *given, const struct destination *d) {
    struct address a;
    uint16_t port;
    return address_of_sockaddr(&given->sa, &a, &port) && port == d->port &&
           a.family == d->address.family && memcmp(a.bytes, d->address.bytes, 16) == 0;
}

socklen_t outgoing_destination(const struct outgoing *o, const struct sockaddr_storage *from,
                               union inet_sockaddr *out) {
    struct address a;
    uint16_t port;
    if (!address_of_sockaddr((const struct sockaddr *)from, &a, &port))
        return 0;
    int on_loopback6 = a.family == 6;
    if (memcmp(a.bytes, on_loopback6 ? loopback6.bytes : loopback4.bytes, 16) != 0)
        return 0;
    for (int i = 0; i < RELAYS_MAX; i++) {
        const struct relay *r = &o->relays[i];
        if (r->port == port && r->loopback6 == on_loopback6) {
            *out = r->destination;
            return out->sa.sa_family == AF_INET ? sizeof out->v4 : sizeof out->v6;
        }
    }
    return 0;
}

// The relay already standing for d on fd's socket: the length of its address in *relay, 0 when
// there is none; -1 when fd has no object and, with `create`, none can be made.
static int relay_known(int fd, const struct destination *d, int create,
                       union inet_sockaddr *relay) {
    struct outgoing *o = outgoing_lock(fd, create);
    if (!o)
        return create ? -1 : 0;
    o->family = d->socket_family;
    socklen_t len = 0;
    for (int i = 0; i < RELAYS_MAX && !len; i++) {
        const struct relay *r = &o->relays[i];
        if (r->port && same_destination(&r->destination, d))
            len = relay_sockaddr(o->family, r->loopback6, r->port, relay);
    }
    outgoing_unlock();
    return (int)len;
}

// Remembers on fd's socket that the session's relay c stands for d (a TCP socket's getsockname
// becomes the agent's socket's): its address as the socket reaches it into *relay, and its
// length.
static socklen_t remember_relay(int fd, const struct destination *d, const struct connected *c,
                                int on_loopback6, union inet_sockaddr *relay) {
    struct outgoing *o = outgoing_lock(fd, 1);
    if (o) {
        o->family = d->socket_family;
        // Slots are taken in order and never freed one by one: the next is free or the oldest.
        struct relay *r = &o->relays[o->next];
        o->next = (uint8_t)((o->next + 1) % RELAYS_MAX);
        r->destination = d->given;
        r->port = c->relay_port;
        r->loopback6 = (uint8_t)on_loopback6;
        if (d->type == SOCK_STREAM)
            o->local_len =
                c->has_local ? sockaddr_of(&c->local, c->local_port, o->family, &o->local) : 0;
        outgoing_unlock();
    } else {
        dbg("too many sockets: fd %d's connection reports the relay as its peer", fd);
    }
    return relay_sockaddr(d->socket_family, on_loopback6, c->relay_port, relay);
}

// Binds fd, when it is not bound yet, where the session knows it by: TCP on the loopback its
// relay is on (the session takes the connection from that port as the one it asked for), UDP on
// the wildcard (the relay sends it datagrams on loopback; the app may send elsewhere too). Its
// address into *local: 0, or -1 with errno.
static int bind_for_relay(int fd, const struct destination *d, int on_loopback6,
                          struct sockaddr_storage *local) {
    socklen_t len = sizeof *local;
    if (CALL_REAL(getsockname, fd, (struct sockaddr *)local, &len) != 0)
        return -1;
    struct address a;
    uint16_t port;
    if (address_of_sockaddr((const struct sockaddr *)local, &a, &port) && port != 0)
        return 0;
    union inet_sockaddr at;
    socklen_t at_len;
    if (d->type == SOCK_STREAM) {
        at_len = relay_sockaddr(d->socket_family, on_loopback6, 0, &at);
    } else {
        memset(&at, 0, sizeof at);
        at.sa.sa_family = (sa_family_t)d->socket_family;
        at_len = d->socket_family == AF_INET ? sizeof at.v4 : sizeof at.v6;
    }
    int rc = CALL_REAL(bind, fd, &at.sa, at_len);
    int error = errno;
    len = sizeof *local;
    // Another thread of the app's may have bound it meanwhile (two first datagrams at once).
    if (CALL_REAL(getsockname, fd, (struct sockaddr *)local, &len) != 0 ||
        !address_of_sockaddr((const struct sockaddr *)local, &a, &port) || port == 0) {
        errno = rc != 0 ? error : EADDRNOTAVAIL;
        return -1;
    }
    return 0;
}

// The relay standing for d on UDP socket fd, asked of the session the first time: the length of
// its address in *relay, or 0 with errno.
static socklen_t udp_relay(int fd, const struct destination *d, union inet_sockaddr *relay) {
    int len = relay_known(fd, d, 1, relay);
    if (len < 0) {
        // Its datagrams could go, but the answers would come from the relay, not the destination.
        dbg("too many sockets: fd %d cannot send through the target", fd);
        errno = ENOBUFS;
        return 0;
    }
    if (len > 0)
        return (socklen_t)len;
    int on_loopback6 = d->address.family == 6 && has_loopback6();
    struct sockaddr_storage local;
    struct connected c;
    if (bind_for_relay(fd, d, on_loopback6, &local) != 0 || ask_connect("udp", d, &local, &c) != 0)
        return 0;
    return remember_relay(fd, d, &c, on_loopback6, relay);
}

// ---- connect ----

// Decision (as mirrord's layer): a connect waits for the agent's, a non-blocking one too, so
// that it fails with the target's own errno. A refused or unreachable destination answers within
// a round trip; one the target's network drops holds the calling thread (an event loop's too)
// until the target's own connect gives up, CONNECT_WAIT_MS at most.
static int connect_tcp(int fd, const struct destination *d) {
    union inet_sockaddr relay;
    int len = relay_known(fd, d, 0, &relay);
    // Connecting again (a non-blocking app learns so how its connect went: EALREADY, EISCONN):
    // the kernel answers for the connection to the relay.
    if (len > 0)
        return CALL_REAL(connect, fd, &relay.sa, (socklen_t)len);
    int on_loopback6 = d->address.family == 6 && has_loopback6();
    struct sockaddr_storage local;
    struct connected c;
    if (bind_for_relay(fd, d, on_loopback6, &local) != 0 || ask_connect("tcp", d, &local, &c) != 0)
        return -1;
    socklen_t relay_len = remember_relay(fd, d, &c, on_loopback6, &relay);
    dbg("fd %d connects through the target (relay port %u)", fd, c.relay_port);
    // EINPROGRESS on a non-blocking socket, as for any connect: the relay accepts at once.
    return CALL_REAL(connect, fd, &relay.sa, relay_len);
}

static int connect_udp(int fd, const struct destination *d) {
    union inet_sockaddr relay;
    socklen_t len = udp_relay(fd, d, &relay);
    return len ? CALL_REAL(connect, fd, &relay.sa, len) : -1;
}

// The layer's own connection to the session uses the real connect (layer.c).
EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    struct destination d;
    if (destination_of(fd, addr, len, &d) && goes_remote(NULL, &d))
        return d.type == SOCK_STREAM ? connect_tcp(fd, &d) : connect_udp(fd, &d);
    return CALL_REAL(connect, fd, addr, len);
}

// ---- datagrams ----

// Where a datagram of the app's to *addr really goes: unchanged, or the relay standing for it
// when it is the target's (then *addr and *len point at *relay). 0, or -1 with errno.
static int datagram_to(int fd, const struct sockaddr **addr, socklen_t *len,
                       union inet_sockaddr *relay) {
    struct destination d;
    if (!destination_of(fd, *addr, *len, &d) || d.type != SOCK_DGRAM || !goes_remote(NULL, &d))
        return 0;
    socklen_t relay_len = udp_relay(fd, &d, relay);
    if (!relay_len)
        return -1;
    *addr = &relay->sa;
    *len = relay_len;
    return 0;
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
                      socklen_t len) {
    union inet_sockaddr relay;
    if (datagram_to(fd, &addr, &len, &relay) != 0)
        return -1;
    return CALL_REAL(sendto, fd, buf, n, flags, addr, len);
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    union inet_sockaddr relay;
    struct msghdr relayed;
    const struct sockaddr *addr = msg ? msg->msg_name : NULL;
    socklen_t len = msg ? msg->msg_namelen : 0;
    if (datagram_to(fd, &addr, &len, &relay) != 0)
        return -1;
    if (msg && addr != msg->msg_name) {
        relayed = *msg;
        relayed.msg_name = (void *)addr;
        relayed.msg_namelen = len;
        msg = &relayed;
    }
    return CALL_REAL(sendmsg, fd, msg, flags);
}

// The messages go in batches with their destinations replaced; a message the session gives no
// relay for ends the call there, as a failed message does the kernel's.
#define SEND_BATCH 64
EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags) {
    if (!outgoing_on || !vec)
        return CALL_REAL(sendmmsg, fd, vec, vlen, flags);
    struct mmsghdr batch[SEND_BATCH];
    union inet_sockaddr relays[SEND_BATCH];
    unsigned int sent = 0;
    for (;;) {
        unsigned int n = 0;
        int error = 0;
        for (; n < SEND_BATCH && sent + n < vlen; n++) {
            batch[n] = vec[sent + n];
            const struct sockaddr *addr = batch[n].msg_hdr.msg_name;
            socklen_t len = batch[n].msg_hdr.msg_namelen;
            if (datagram_to(fd, &addr, &len, &relays[n]) != 0) {
                error = errno;
                break;
            }
            batch[n].msg_hdr.msg_name = (void *)addr;
            batch[n].msg_hdr.msg_namelen = len;
        }
        int rc = n ? CALL_REAL(sendmmsg, fd, batch, n, flags) : 0;
        if (rc < 0)
            return sent ? (int)sent : -1;
        for (int i = 0; i < rc; i++)
            vec[sent + (unsigned int)i].msg_len = batch[i].msg_len;
        sent += (unsigned int)rc;
        if (error && sent == 0) {
            errno = error;
            return -1;
        }
        if (error || (unsigned int)rc < n || sent == vlen)
            return (int)sent;
    }
}

// A datagram's source that is one of fd's relays becomes the destination it stands for, in the
// caller's addr of `room` bytes (as the kernel fills it).
static void source_of(int fd, struct sockaddr *addr, socklen_t *len, socklen_t room) {
    if (!outgoing_on || !addr || *len > room || *len > sizeof(struct sockaddr_storage))
        return;
    struct sockaddr_storage from;
    memset(&from, 0, sizeof from);
    memcpy(&from, addr, *len);
    struct outgoing *o = outgoing_lock(fd, 0);
    if (!o)
        return;
    union inet_sockaddr destination;
    socklen_t dlen = outgoing_destination(o, &from, &destination);
    outgoing_unlock();
    if (dlen) {
        memcpy(addr, &destination, dlen < room ? dlen : room);
        *len = dlen;
    }
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
                        socklen_t *len) {
    socklen_t room = addr && len ? *len : 0;
    ssize_t rc = CALL_REAL(recvfrom, fd, buf, n, flags, addr, len);
    if (rc >= 0 && room)
        source_of(fd, addr, len, room);
    return rc;
}

// What _FORTIFY_SOURCE makes of recvfrom into a buffer of known size.
EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *addr, socklen_t *len) {
    if (n > buflen) // the real one reports the overflow
        return CALL_REAL(__recvfrom_chk, fd, buf, n, buflen, flags, addr, len);
    return recvfrom(fd, buf, n, flags, addr, len);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    socklen_t room = msg && msg->msg_name ? msg->msg_namelen : 0;
    ssize_t rc = CALL_REAL(recvmsg, fd, msg, flags);
    if (rc >= 0 && room)
        source_of(fd, msg->msg_name, &msg->msg_namelen, room);
    return rc;
}

EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags,
                    struct timespec *timeout) {
    if (!outgoing_on || !vec)
        return CALL_REAL(recvmmsg, fd, vec, vlen, flags, timeout);
    // The kernel takes at most UIO_MAXIOV (1024) messages at once.
    socklen_t rooms[1024];
    unsigned int kept = vlen < 1024 ? vlen : 1024;
    for (unsigned int i = 0; i < kept; i++)
        rooms[i] = vec[i].msg_hdr.msg_name ? vec[i].msg_hdr.msg_namelen : 0;
    int rc = CALL_REAL(recvmmsg, fd, vec, vlen, flags, timeout);
    for (int i = 0; i < rc && (unsigned int)i < kept; i++) {
        if (rooms[i])
            source_of(fd, vec[i].msg_hdr.msg_name, &vec[i].msg_hdr.msg_namelen, rooms[i]);
    }
    return rc;
}

// ---- names ----

// The target's addresses for node made into glibc's own result: the real getaddrinfo for each
// address (numeric, so it looks nothing up) with the app's service and hints, the lists chained
// in the target's order. So services, socket types, AI_PASSIVE and AI_V4MAPPED are glibc's, and
// glibc's freeaddrinfo frees it all.
static int remote_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                              struct addrinfo **res) {
    struct addrinfo numeric;
    memset(&numeric, 0, sizeof numeric);
    if (hints) {
        numeric.ai_family = hints->ai_family;
        numeric.ai_socktype = hints->ai_socktype;
        numeric.ai_protocol = hints->ai_protocol;
    }
    int flags = hints ? hints->ai_flags : AI_V4MAPPED | AI_ADDRCONFIG; // glibc's without hints
    // An IPv6 question with AI_V4MAPPED takes IPv4 addresses when there are no IPv6 ones: both
    // are asked for.
    int mapped = numeric.ai_family == AF_INET6 && (flags & AI_V4MAPPED);
    int family = numeric.ai_family == AF_INET               ? 4
                 : numeric.ai_family == AF_INET6 && !mapped ? 6
                                                            : 0;
    struct resolved r;
    int error = resolve(node, family, &r);
    if (error)
        return error;
    int any6 = 0;
    for (int i = 0; i < r.count; i++)
        any6 |= r.addresses[i].family == 6;
    // The target's addresses, wherever this machine has addresses of its own.
    // (AI_CANONIDN is refused without AI_CANONNAME.)
    numeric.ai_flags = (flags | AI_NUMERICHOST) & ~(AI_ADDRCONFIG | AI_CANONNAME | AI_CANONIDN);
    struct addrinfo *head = NULL, **tail = &head;
    int first_error = 0;
    for (int i = 0; i < r.count; i++) {
        if (mapped && any6 && !(flags & AI_ALL) && r.addresses[i].family == 4)
            continue;
        char text[INET6_ADDRSTRLEN];
        address_text(&r.addresses[i], text, sizeof text);
        struct addrinfo *part;
        int rc = CALL_REAL(getaddrinfo, text, service, &numeric, &part);
        if (rc != 0) {
            first_error = first_error ? first_error : rc;
            continue;
        }
        *tail = part;
        while (*tail)
            tail = &(*tail)->ai_next;
    }
    if (!head)
        return first_error ? first_error : EAI_NONAME;
    if (flags & AI_CANONNAME) {
        head->ai_canonname = strdup(r.canonical[0] ? r.canonical : node);
        if (!head->ai_canonname) {
            freeaddrinfo(head);
            return EAI_MEMORY;
        }
    }
    *res = head;
    return 0;
}

EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                       struct addrinfo **res) {
    int family = hints ? hints->ai_family : AF_UNSPEC;
    int decision = (hints && (hints->ai_flags & AI_NUMERICHOST)) ||
                           (family != AF_UNSPEC && family != AF_INET && family != AF_INET6)
                       ? -1
                       : name_decision(node);
    if (decision == 1)
        return remote_getaddrinfo(node, service, hints, res);
    int rc = CALL_REAL(getaddrinfo, node, service, hints, res);
    if (rc == 0 && decision == 0) {
        for (const struct addrinfo *ai = *res; ai; ai = ai->ai_next)
            remember_local(node, ai->ai_addr);
    }
    return rc;
}

static int h_errno_of(int eai) {
    switch (eai) {
    case EAI_NONAME:
        return HOST_NOT_FOUND;
    case EAI_AGAIN:
        return TRY_AGAIN;
    case EAI_NODATA:
        return NO_DATA;
    default:
        return NO_RECOVERY;
    }
}

// The target's addresses of family af for name as a hostent in buf: h_name the canonical name,
// name itself an alias when it differs. 0, or ERANGE when buf is too small.
static int fill_hostent(const char *name, int af, const struct resolved *r, struct hostent *h,
                        char *buf, size_t room) {
    int want = af == AF_INET ? 4 : 6;
    size_t size = af == AF_INET ? 4 : 16;
    int n = 0;
    for (int i = 0; i < r->count; i++)
        n += r->addresses[i].family == want;
    const char *canonical = r->canonical[0] ? r->canonical : name;
    int alias = strcmp(canonical, name) != 0;
    size_t pad = (size_t)(-(uintptr_t)buf & (sizeof(char *) - 1));
    size_t need = pad + (size_t)(2 + n + 1) * sizeof(char *) + (size_t)n * size +
                  strlen(canonical) + 1 + strlen(name) + 1;
    if (need > room)
        return ERANGE;
    char **aliases = (char **)(void *)(buf + pad);
    char **list = aliases + 2;
    char *at = (char *)(list + n + 1);
    for (int i = 0; i < r->count; i++) {
        if (r->addresses[i].family != want)
            continue;
        memcpy(at, r->addresses[i].bytes, size);
        *list++ = at;
        at += size;
    }
    *list = NULL;
    h->h_name = strcpy(at, canonical);
    at += strlen(canonical) + 1;
    aliases[0] = alias ? strcpy(at, name) : NULL;
    aliases[1] = NULL;
    h->h_aliases = aliases;
    h->h_addrtype = af;
    h->h_length = (int)size;
    h->h_addr_list = aliases + 2;
    return 0;
}

// The target's answer for name in family af as gethostbyname2_r gives it: 0 with *result (NULL
// when there is none, *h_err saying why), ERANGE when buf is too small, EAGAIN when no answer
// came.
static int remote_hostent(const char *name, int af, struct hostent *h, char *buf, size_t room,
                          struct hostent **result, int *h_err) {
    *result = NULL;
    struct resolved r;
    int error = resolve(name, af == AF_INET ? 4 : 6, &r);
    int found = 0;
    for (int i = 0; !error && i < r.count; i++)
        found |= r.addresses[i].family == (af == AF_INET ? 4 : 6);
    if (!error && !found)
        error = EAI_NODATA;
    if (error) {
        *h_err = h_errno_of(error);
        return error == EAI_AGAIN ? EAGAIN : 0;
    }
    if (fill_hostent(name, af, &r, h, buf, room) != 0) {
        *h_err = NETDB_INTERNAL;
        return ERANGE;
    }
    *result = h;
    return 0;
}

// What gethostbyname and gethostbyname2 return: the thread's own (glibc's is the process's).
static __thread struct {
    struct hostent h;
    char buf[HOSTENT_ROOM];
} hostent_result;

static struct hostent *remote_hostent_static(const char *name, int af) {
    struct hostent *result;
    int h_err;
    remote_hostent(name, af, &hostent_result.h, hostent_result.buf, sizeof hostent_result.buf,
                   &result, &h_err);
    if (!result)
        h_errno = h_err;
    return result;
}

static int hostent_decision(const char *name, int af) {
    return af == AF_INET || af == AF_INET6 ? name_decision(name) : -1;
}

static void remember_hostent(const char *name, const struct hostent *h) {
    for (char **a = h ? h->h_addr_list : NULL; a && *a; a++) {
        union inet_sockaddr sa;
        struct address address = {h->h_addrtype == AF_INET ? 4 : 6, {0}};
        memcpy(address.bytes, *a, h->h_addrtype == AF_INET ? 4 : 16);
        sockaddr_of(&address, 0, h->h_addrtype, &sa);
        remember_local(name, &sa.sa);
    }
}

EXPORT struct hostent *gethostbyname(const char *name) {
    int decision = hostent_decision(name, AF_INET);
    if (decision == 1)
        return remote_hostent_static(name, AF_INET);
    gethostbyname_fn real = real_gethostbyname();
    struct hostent *h = real ? real(name) : NULL;
    if (decision == 0)
        remember_hostent(name, h);
    return h;
}

EXPORT struct hostent *gethostbyname2(const char *name, int af) {
    int decision = hostent_decision(name, af);
    if (decision == 1)
        return remote_hostent_static(name, af);
    gethostbyname2_fn real = real_gethostbyname2();
    struct hostent *h = real ? real(name, af) : NULL;
    if (decision == 0)
        remember_hostent(name, h);
    return h;
}

EXPORT int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen,
                           struct hostent **result, int *h_errnop) {
    int decision = hostent_decision(name, AF_INET);
    if (decision == 1)
        return remote_hostent(name, AF_INET, ret, buf, buflen, result, h_errnop);
    gethostbyname_r_fn real = real_gethostbyname_r();
    if (!real)
        return ENOSYS;
    int rc = real(name, ret, buf, buflen, result, h_errnop);
    if (rc == 0 && decision == 0)
        remember_hostent(name, *result);
    return rc;
}

EXPORT int gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
                            struct hostent **result, int *h_errnop) {
    int decision = hostent_decision(name, af);
    if (decision == 1)
        return remote_hostent(name, af, ret, buf, buflen, result, h_errnop);
    gethostbyname2_r_fn real = real_gethostbyname2_r();
    if (!real)
        return ENOSYS;
    int rc = real(name, af, ret, buf, buflen, result, h_errnop);
    if (rc == 0 && decision == 0)
        remember_hostent(name, *result);
    return rc;
}
