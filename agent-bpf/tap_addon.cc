// The tap's loader: loads tap.bpf.o (embedded through its skeleton), attaches it to the ingress of
// every interface of a target network namespace and streams ring buffer records to JavaScript in
// batches. See tap.h for the record layout and src/agent/tap.ts for the JavaScript side.
#include <napi.h>
#include <uv.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "record_merger.h"
#include "tap.h"
#include "tap.skel.h"

namespace {

static_assert(sizeof(tap_record) == 64, "tap_record layout is shared with src/agent/tap.ts");

// enum bpf_attach_type's BPF_TCX_INGRESS (Linux 6.6+, checked against the kernel's BTF). The
// uapi headers this builds with may predate it.
constexpr auto kTcxIngress = static_cast<enum bpf_attach_type>(46);

// Legacy tc filters are identified by this fixed handle and priority, so that a later agent can
// find (and replace) a filter that a killed agent left behind. A consequence: in tc mode only one
// tap can be attached per network namespace at a time.
constexpr __u32 kTcHandle = 0x6d697272; // "mirr"
constexpr __u32 kTcPriority = 0x6d72;   // "mr"

// A batch must hold the largest record (64 KiB of payload and its header) with room to spare.
constexpr size_t kMinBatchBytes = 128 * 1024;
// How long the consumer pauses between drains while records flow: (rate / 2,236 records/s)²
// ms, within these bounds (see Drainer::drainAndSchedule): 5 ms up to 5k records a second, 20 ms at
// 10k, 45 ms at 15k. The lower bound is the lag budget: a record waits in the ring up to this long
// so that one drain, and one wakeup of JavaScript, takes all the records of that time. Each
// drain costs the agent about 400 µs of CPU on the target's node, whatever it carries (a
// context switch in a VM, the call into JavaScript, a socket write): draining every 5 ms is 8 %
// of a CPU, so past the rate at which the lag is promised (10 ms at 5k requests a second) the
// pause grows until the drains' share is small next to the records' own cost. A ring a quarter
// full wakes the consumer early (tap.bpf.c), so a long pause never overflows it.
constexpr int kMinPauseMillis = 5;
constexpr int kMaxPauseMillis = 200;
constexpr double kRecordsPerSecondForOneMilli = 2236;
constexpr int kIdleCheckMillis = 100;
// The record rate that sets the pause is averaged over about this long: clients send in bursts
// (a load generator's 32 connections at once), and a rate taken from one drain would read a
// burst as a flood and pause for tens of milliseconds at a thousand requests a second.
constexpr double kRateAverageSeconds = 1.0;
// Room for several records of the largest size (64 KiB of payload).
constexpr size_t kMinRingBytes = 256 * 1024;
constexpr size_t kMaxRingBytes = size_t(1) << 30;

struct TapFailure : std::runtime_error {
    std::string code;
    TapFailure(std::string c, const std::string &message)
        : std::runtime_error(message), code(std::move(c)) {}
};

[[noreturn]] void fail(const char *code, const std::string &message) {
    throw TapFailure(code, message);
}

std::string errnoText(int err) { return std::strerror(err < 0 ? -err : err); }

[[noreturn]] void failBpf(const std::string &what, int err) {
    err = err < 0 ? -err : err;
    if (err == EPERM || err == EACCES)
        fail("NO_PRIVILEGE", what + ": needs root or CAP_BPF+CAP_NET_ADMIN");
    fail("BPF_FAILED", what + ": " + errnoText(err));
}

// Runs fn on a short-lived thread with every signal blocked and returns its result. The verifier
// gives up with EAGAIN whenever a signal is pending, and the JS thread receives signals often
// (a profiler's SIGPROF every millisecond), so loading there can fail every time.
template <typename Fn> int onQuietThread(Fn fn) {
    int result = 0;
    std::thread thread([&] {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, nullptr);
        result = fn();
    });
    thread.join();
    return result;
}

// Runs fn on a short-lived thread that has joined the network namespace nsFd, so that the Node
// process itself never changes namespace. Kernel objects created there (links, filters) outlive
// the thread.
template <typename Fn> void inNetns(int nsFd, const std::string &nsLabel, Fn fn) {
    std::exception_ptr error;
    std::thread thread([&] {
        try {
            if (setns(nsFd, CLONE_NEWNET) != 0) {
                int err = errno;
                if (err == EPERM)
                    fail("NO_PRIVILEGE", "entering " + nsLabel + ": needs root or CAP_SYS_ADMIN");
                if (err == EINVAL)
                    fail("BAD_TARGET", nsLabel + " is not a network namespace");
                fail("BAD_TARGET", "entering " + nsLabel + ": " + errnoText(err));
            }
            fn();
        } catch (...) {
            error = std::current_exception();
        }
    });
    thread.join();
    if (error)
        std::rethrow_exception(error);
}

struct Interface {
    unsigned ifindex;
    std::string name;
    int progFd;
    int linkFd = -1; // tcx mode
};

// Drains the ring buffer on JavaScript's own thread and event loop, and hands each drain to
// JavaScript as a batch in one buffer that JavaScript allocated: one thread wakes per drain
// (a consumer thread of its own cost a second context switch and a cross-thread handoff each
// time, a sixth of the agent's CPU at a thousand requests a second), memory stays fixed however
// fast records arrive, and no garbage is left for V8 to collect. While records flow a timer
// paces the drains; after an idle spell, and when the ring fills, the BPF program's wakeup ends
// the wait (watched through an epoll fd of our own, see Drainer()). A batch is valid until the
// callback returns. While JavaScript has paused the tap nothing is drained: the ring takes what
// arrives, and once it is full the BPF program counts what it could not copy.
//
// Closing may happen inside the callback (a handler that ends the session), that is, inside
// ring_buffer__consume: close() only stops and marks, and the drainer frees itself once libuv
// has closed its handles, on a later turn of the loop.
class Drainer {
  public:
    Drainer(napi_env env, int ringFd, volatile __u32 *idleFlag, volatile __u32 *wakeupSentFlag,
            const Napi::Function &callback, uint8_t *batch, size_t batchBytes)
        : env_(env), idleFlag_(idleFlag), wakeupSentFlag_(wakeupSentFlag), batch_(batch),
          batchBytes_(batchBytes), merger_(batchBytes), callback_(Napi::Persistent(callback)),
          context_(env, "mirrord-tap") {
        uv_loop_t *loop = nullptr;
        if (napi_get_uv_event_loop(env, &loop) != napi_ok)
            fail("BPF_FAILED", "no event loop to drain the ring buffer on");
        rb_ = ring_buffer__new(ringFd, &Drainer::onRecord, this, nullptr);
        epollFd_ = epoll_create1(EPOLL_CLOEXEC);
        epoll_event ring{};
        // Edge-triggered on the ring: our epoll fd then becomes readable on the BPF program's
        // wakeups only, not whenever the ring merely holds records, so a pause between drains
        // is not cut short by each record that arrives.
        ring.events = EPOLLIN | EPOLLET;
        ring.data.fd = ringFd;
        if (!rb_ || epollFd_ < 0 || epoll_ctl(epollFd_, EPOLL_CTL_ADD, ringFd, &ring) != 0) {
            int err = errno;
            freeRing();
            failBpf("setting up the ring buffer consumer", err);
        }
        int err = uv_poll_init(loop, &poll_, epollFd_);
        if (err != 0) {
            freeRing();
            fail("BPF_FAILED", std::string("watching the ring buffer: ") + uv_strerror(err));
        }
        uv_timer_init(loop, &timer_);
        timer_.data = this;
        poll_.data = this;
        uv_poll_start(&poll_, UV_READABLE, &Drainer::onWakeup);
        // Idle from the start: no port is subscribed yet, so the ring is empty.
        __atomic_store_n(idleFlag_, 1, __ATOMIC_SEQ_CST);
        uv_timer_start(&timer_, &Drainer::onTimer, kIdleCheckMillis, 0);
    }

    // Stops draining; the drainer deletes itself once libuv has closed its handles.
    void close() {
        closing_ = true;
        uv_timer_stop(&timer_);
        uv_poll_stop(&poll_);
        uv_close(reinterpret_cast<uv_handle_t *>(&timer_), &Drainer::onHandleClosed);
        uv_close(reinterpret_cast<uv_handle_t *>(&poll_), &Drainer::onHandleClosed);
    }

    void pause() { paused_ = true; }

    // Drains at the loop's next turn, what waited in the batch first: not from inside resume(),
    // which JavaScript may call from a batch's handler.
    void resume() {
        if (!paused_ || closing_)
            return;
        paused_ = false;
        active_ = true;
        uv_timer_start(&timer_, &Drainer::onTimer, 0, 0);
    }

  private:
    ~Drainer() { freeRing(); }

    void freeRing() {
        if (rb_)
            ring_buffer__free(rb_);
        rb_ = nullptr;
        if (epollFd_ >= 0)
            ::close(epollFd_);
        epollFd_ = -1;
    }

    static void onHandleClosed(uv_handle_t *handle) {
        auto *self = static_cast<Drainer *>(handle->data);
        if (++self->handlesClosed_ == 2)
            delete self;
    }

    // The BPF program's wakeup: the first record after an idle spell, or a ring a quarter full.
    static void onWakeup(uv_poll_t *poll, int, int) {
        auto *self = static_cast<Drainer *>(poll->data);
        epoll_event events[1];
        // Takes the edge, so that our fd is quiet until the next wakeup.
        while (epoll_wait(self->epollFd_, events, 1, 0) > 0) {
        }
        if (self->paused_ || self->closing_)
            return;
        if (!self->active_) {
            // The first record after an idle spell: gather for the lag budget before draining.
            // Not for the last pause: the rate it came from may be long gone.
            self->active_ = true;
            __atomic_store_n(self->idleFlag_, 0, __ATOMIC_SEQ_CST);
            self->pauseMillis_ = kMinPauseMillis;
            uv_timer_start(&self->timer_, &Drainer::onTimer, kMinPauseMillis, 0);
            return;
        }
        self->drainAndSchedule();
    }

    static void onTimer(uv_timer_t *timer) {
        static_cast<Drainer *>(timer->data)->drainAndSchedule();
    }

    // Drains, then waits a pause that grows with the square of the record rate: while the
    // target has CPU to spare it keeps the mirror's lag to a few milliseconds, and when the
    // target is busy, when each wakeup preempts it, it keeps wakeups to a few dozen a second.
    void drainAndSchedule() {
        if (paused_ || closing_)
            return;
        auto now = std::chrono::steady_clock::now();
        double seconds = std::chrono::duration<double>(now - lastDrain_).count();
        lastDrain_ = now;
        size_t records = drain();
        if (closing_ || paused_)
            return;
        if (records == 0) {
            goIdle();
            return;
        }
        seconds = std::max(seconds, 1e-4);
        double weight = 1 - std::exp(-seconds / kRateAverageSeconds);
        recordsPerSecond_ += weight * (records / seconds - recordsPerSecond_);
        double load = recordsPerSecond_ / kRecordsPerSecondForOneMilli;
        pauseMillis_ = std::clamp(static_cast<int>(load * load), kMinPauseMillis, kMaxPauseMillis);
        uv_timer_start(&timer_, &Drainer::onTimer, static_cast<uint64_t>(pauseMillis_), 0);
    }

    // No records in a drain: wait for the BPF program's wakeup.
    void goIdle() {
        active_ = false;
        __atomic_store_n(idleFlag_, 1, __ATOMIC_SEQ_CST);
        // A record committed before the program saw the flag sent no wakeup: take it now.
        if (drain() > 0 && !closing_ && !paused_) {
            __atomic_store_n(idleFlag_, 0, __ATOMIC_SEQ_CST);
            active_ = true;
            uv_timer_start(&timer_, &Drainer::onTimer, static_cast<uint64_t>(pauseMillis_), 0);
            return;
        }
        // One committed while this drain read the ring, after the program had read the flag,
        // sent none either: the idle check takes it, as a last resort.
        if (!closing_ && !paused_)
            uv_timer_start(&timer_, &Drainer::onTimer, kIdleCheckMillis, 0);
    }

    // Hands over what waited in the batch, then what the ring holds; the records taken.
    size_t drain() {
        records_ = 0;
        if (merger_.stagedBytes() > 0 && !deliver())
            return records_;
        // Before draining: a ring that fills again meanwhile may wake us once more.
        __atomic_store_n(wakeupSentFlag_, 0, __ATOMIC_SEQ_CST);
        ring_buffer__consume(rb_);
        if (!closing_ && !paused_ && merger_.stagedBytes() > 0)
            deliver();
        return records_;
    }

    // Stops consuming (-1) once JavaScript paused or closed the tap during a batch; the record
    // at hand is kept in the batch, not lost.
    static int onRecord(void *ctx, void *data, size_t size) {
        auto *self = static_cast<Drainer *>(ctx);
        if (self->merger_.stagedBytes() + RecordMerger::padded(size) > self->batchBytes_)
            self->deliver();
        if (self->closing_)
            return -1;
        self->merger_.add(data, size);
        self->records_++;
        return self->paused_ ? -1 : 0;
    }

    // Calls JavaScript with the batch; false when it paused or closed the tap meanwhile.
    bool deliver() {
        size_t length = merger_.writeTo(batch_);
        Napi::HandleScope scope(env_);
        try {
            callback_.MakeCallback(Napi::Env(env_).Global(),
                                   {Napi::Number::New(env_, static_cast<double>(length))},
                                   context_);
        } catch (const Napi::Error &error) {
            // As for any callback from the loop: the process's uncaught exception.
            napi_fatal_exception(env_, error.Value());
        }
        return !closing_ && !paused_;
    }

    napi_env env_;
    volatile __u32 *idleFlag_;
    volatile __u32 *wakeupSentFlag_;
    uint8_t *batch_;
    size_t batchBytes_;
    RecordMerger merger_;
    Napi::FunctionReference callback_;
    Napi::AsyncContext context_;
    ring_buffer *rb_ = nullptr;
    int epollFd_ = -1;
    uv_timer_t timer_{};
    uv_poll_t poll_{};
    int handlesClosed_ = 0;
    bool active_ = false;
    bool paused_ = false;
    bool closing_ = false;
    size_t records_ = 0;
    int pauseMillis_ = kMinPauseMillis;
    double recordsPerSecond_ = 0;
    std::chrono::steady_clock::time_point lastDrain_ = std::chrono::steady_clock::now();
};

struct Target {
    int nsFd = -1;
    std::string label;
};

Target openTarget(const Napi::Object &target) {
    Target t;
    std::string path;
    if (target.Has("pid")) {
        auto v = target.Get("pid");
        if (!v.IsNumber() || v.As<Napi::Number>().DoubleValue() < 1 ||
            v.As<Napi::Number>().DoubleValue() != v.As<Napi::Number>().Int64Value())
            fail("BAD_TARGET", "target pid must be a positive integer");
        auto pid = v.As<Napi::Number>().Int64Value();
        path = "/proc/" + std::to_string(pid) + "/ns/net";
        t.label = "the network namespace of PID " + std::to_string(pid);
        t.nsFd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (t.nsFd < 0 && (errno == ENOENT || errno == ESRCH))
            fail("NO_SUCH_PROCESS", "no process with PID " + std::to_string(pid));
    } else if (target.Has("netns")) {
        auto v = target.Get("netns");
        std::string name = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
        if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
            fail("BAD_TARGET", "target netns must be a network namespace name (as in ip netns)");
        path = "/run/netns/" + name;
        t.label = "network namespace " + name;
        t.nsFd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (t.nsFd < 0 && errno == ENOENT)
            fail("NO_SUCH_NETNS", "no network namespace named " + name + " (" + path + ")");
    } else {
        fail("BAD_TARGET", "target must be { pid } or { netns }");
    }
    if (t.nsFd < 0) {
        int err = errno;
        if (err == EACCES || err == EPERM)
            fail("NO_PRIVILEGE", "opening " + path + ": needs root");
        fail("BAD_TARGET", "opening " + path + ": " + errnoText(err));
    }
    return t;
}

void checkKernel() {
    int fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, nullptr, 4, 4, 1, nullptr);
    if (fd < 0) {
        int err = errno;
        if (err == ENOSYS)
            fail("NO_BPF", "this kernel has no BPF support (bpf(2): ENOSYS)");
        failBpf("creating a BPF map", err);
    }
    close(fd);
    if (libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, nullptr) != 1)
        fail("NO_RINGBUF", "this kernel has no BPF ring buffer (needs Linux 5.8 or later)");
}

// Inside the target netns: lists the interfaces and picks, per interface, the program that
// matches where its skbs start (Ethernet header or directly IP).
std::vector<Interface> listInterfaces(tap_bpf *skel) {
    std::vector<Interface> out;
    struct if_nameindex *names = if_nameindex();
    if (!names)
        fail("BAD_TARGET", "listing interfaces: " + errnoText(errno));
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    for (auto *n = names; n->if_index != 0; n++) {
        ifreq ifr{};
        std::strncpy(ifr.ifr_name, n->if_name, IFNAMSIZ - 1);
        bool ethernet = true;
        if (sock >= 0 && ioctl(sock, SIOCGIFHWADDR, &ifr) == 0)
            ethernet = ifr.ifr_hwaddr.sa_family == ARPHRD_ETHER ||
                       ifr.ifr_hwaddr.sa_family == ARPHRD_LOOPBACK;
        int prog = bpf_program__fd(ethernet ? skel->progs.tap_eth : skel->progs.tap_l3);
        out.push_back(Interface{n->if_index, n->if_name, prog});
    }
    if (sock >= 0)
        close(sock);
    if_freenameindex(names);
    if (out.empty())
        fail("NO_INTERFACES", "the target network namespace has no interfaces");
    return out;
}

bpf_tc_hook tcHook(unsigned ifindex) {
    bpf_tc_hook hook{};
    hook.sz = sizeof(hook);
    hook.ifindex = static_cast<int>(ifindex);
    hook.attach_point = BPF_TC_INGRESS;
    return hook;
}

bpf_tc_opts tcOpts() {
    bpf_tc_opts opts{};
    opts.sz = sizeof(opts);
    opts.handle = kTcHandle;
    opts.priority = kTcPriority;
    return opts;
}

__u32 progId(int progFd) {
    bpf_prog_info info{};
    __u32 len = sizeof(info);
    return bpf_obj_get_info_by_fd(progFd, &info, &len) == 0 ? info.id : 0;
}

// Removes our filter unless another agent has replaced it since. The clsact qdisc stays: other
// software (CNI plugins, Cilium) may have filters on it, and deleting the qdisc deletes those.
void detachTc(const Interface &iface) {
    auto hook = tcHook(iface.ifindex);
    auto opts = tcOpts();
    if (bpf_tc_query(&hook, &opts) != 0 || opts.prog_id != progId(iface.progFd))
        return;
    auto del = tcOpts();
    bpf_tc_detach(&hook, &del);
}

// tc mode: a filter with our handle and priority replaces the one a killed agent left behind.
void attachTc(Interface &iface) {
    auto hook = tcHook(iface.ifindex);
    int err = bpf_tc_hook_create(&hook);
    if (err && err != -EEXIST)
        failBpf("creating the clsact qdisc on " + iface.name, err);
    auto opts = tcOpts();
    opts.prog_fd = iface.progFd;
    opts.flags = BPF_TC_F_REPLACE;
    err = bpf_tc_attach(&hook, &opts);
    if (err)
        failBpf("attaching a tc filter to " + iface.name, err);
}

enum class Mode { Auto, Tcx, Tc };

class TapState {
  public:
    ~TapState() { close(); }

    static std::unique_ptr<TapState> open(Napi::Env env, const Napi::Object &target,
                                          const Napi::Function &callback, size_t ringBytes,
                                          Mode mode, uint8_t *batch, size_t batchBytes) {
        auto t = std::make_unique<TapState>();
        Target tgt = openTarget(target);
        t->nsFd_ = tgt.nsFd;
        t->nsLabel_ = tgt.label;
        checkKernel();

        int cpus = libbpf_num_possible_cpus();
        if (cpus <= 0)
            failBpf("counting CPUs", cpus);
        t->skel_ = tap_bpf__open();
        if (!t->skel_)
            failBpf("opening the tap BPF object", -errno);
        bpf_map__set_max_entries(t->skel_->maps.scratch, static_cast<__u32>(cpus));
        bpf_map__set_max_entries(t->skel_->maps.events, static_cast<__u32>(ringBytes));
        t->skel_->rodata->ring_bytes = ringBytes;
        int err = onQuietThread([&] { return tap_bpf__load(t->skel_); });
        if (err)
            failBpf("loading the tap BPF program (MIRRORD_TAP_DEBUG=1 prints libbpf's log)", err);
        t->cpus_ = static_cast<size_t>(cpus);

        inNetns(t->nsFd_, t->nsLabel_, [&] { t->attach(mode); });
        if (!t->tcMode_) {
            // Links do not need the namespace again (the agent's presence check holds it while
            // it watches the target: src/agent/target.ts).
            ::close(t->nsFd_);
            t->nsFd_ = -1;
        }

        t->drainer_ =
            new Drainer(env, bpf_map__fd(t->skel_->maps.events), &t->skel_->bss->consumer_idle,
                        &t->skel_->bss->wakeup_sent, callback, batch, batchBytes);
        return t;
    }

    bool tcMode() const { return tcMode_; }

    void pause() {
        if (drainer_)
            drainer_->pause();
    }

    void resume() {
        if (drainer_)
            drainer_->resume();
    }
    const std::vector<Interface> &interfaces() const { return ifaces_; }

    void setPort(uint16_t port, bool on) {
        __u32 key = port;
        __u8 subscribed = on ? 1 : 0;
        int err = bpf_map__update_elem(skel_->maps.ports, &key, sizeof(key), &subscribed,
                                       sizeof(subscribed), BPF_ANY);
        if (err)
            failBpf(std::string(on ? "subscribing" : "unsubscribing") + " port " +
                        std::to_string(port),
                    err);
    }

    tap_counters counters() const {
        tap_counters sum{};
        std::vector<tap_counters> perCpu(cpus_);
        __u32 key = 0;
        if (bpf_map__lookup_elem(skel_->maps.counters, &key, sizeof(key), perCpu.data(),
                                 perCpu.size() * sizeof(tap_counters), 0) != 0)
            return sum;
        for (const auto &c : perCpu) {
            sum.segments_copied += c.segments_copied;
            sum.bytes_copied += c.bytes_copied;
            sum.segments_dropped += c.segments_dropped;
            sum.bytes_dropped += c.bytes_dropped;
        }
        return sum;
    }

    void close() {
        detach();
        if (drainer_) {
            drainer_->close();
            drainer_ = nullptr;
        }
        if (skel_) {
            tap_bpf__destroy(skel_);
            skel_ = nullptr;
        }
        if (nsFd_ >= 0) {
            ::close(nsFd_);
            nsFd_ = -1;
        }
    }

  private:
    void attach(Mode mode) {
        ifaces_ = listInterfaces(skel_);
        try {
            tcMode_ = mode == Mode::Tc;
            for (auto &iface : ifaces_) {
                if (tcMode_) {
                    attachTc(iface);
                    continue;
                }
                iface.linkFd = bpf_link_create(iface.progFd, static_cast<int>(iface.ifindex),
                                               kTcxIngress, nullptr);
                if (iface.linkFd >= 0)
                    continue;
                int err = errno;
                // Kernels before 6.6 reject the attach type itself.
                if (err == EINVAL && &iface == &ifaces_.front()) {
                    if (mode == Mode::Tcx)
                        fail("NO_TCX", "this kernel has no TCX links (needs Linux 6.6 or later); "
                                       "use attachMode 'tc'");
                    tcMode_ = true;
                    attachTc(iface);
                    continue;
                }
                failBpf("attaching to " + iface.name, err);
            }
        } catch (...) {
            detachAll();
            throw;
        }
    }

    void detachAll() {
        for (auto &iface : ifaces_) {
            if (iface.linkFd >= 0) {
                ::close(iface.linkFd);
                iface.linkFd = -1;
            } else if (tcMode_) {
                detachTc(iface);
            }
        }
        ifaces_.clear();
    }

    void detach() {
        if (ifaces_.empty())
            return;
        if (!tcMode_) {
            detachAll();
            return;
        }
        try {
            inNetns(nsFd_, nsLabel_, [&] { detachAll(); });
        } catch (...) {
            // Closing cannot fail; filters left behind are replaced by the next open in tc mode.
            ifaces_.clear();
        }
    }

    tap_bpf *skel_ = nullptr;
    size_t cpus_ = 0;
    int nsFd_ = -1;
    std::string nsLabel_;
    bool tcMode_ = false;
    std::vector<Interface> ifaces_;
    // Deletes itself once closed (see Drainer).
    Drainer *drainer_ = nullptr;
};

// Runs fn, turning a TapFailure into a JavaScript Error whose `code` names the cause.
template <typename Fn> Napi::Value guarded(const Napi::Env &env, Fn fn) {
    try {
        return fn();
    } catch (const TapFailure &f) {
        auto error = Napi::Error::New(env, f.what());
        error.Set("code", f.code);
        throw error;
    }
}

uint16_t portArg(const Napi::CallbackInfo &info) {
    double p = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    if (!(p >= 1 && p <= 65535) || p != static_cast<uint16_t>(p))
        fail("BAD_ARGUMENT", "port must be an integer from 1 to 65535");
    return static_cast<uint16_t>(p);
}

class TapHandle : public Napi::ObjectWrap<TapHandle> {
  public:
    static Napi::Function define(Napi::Env env) {
        return DefineClass(env, "TapHandle",
                           {
                               InstanceMethod<&TapHandle::subscribe>("subscribe"),
                               InstanceMethod<&TapHandle::unsubscribe>("unsubscribe"),
                               InstanceMethod<&TapHandle::counters>("counters"),
                               InstanceMethod<&TapHandle::pause>("pause"),
                               InstanceMethod<&TapHandle::resume>("resume"),
                               InstanceMethod<&TapHandle::close>("close"),
                           });
    }

    // Called only by openTap, with the already opened state.
    explicit TapHandle(const Napi::CallbackInfo &info)
        : Napi::ObjectWrap<TapHandle>(info), env_(info.Env()) {
        state_.reset(info[0].As<Napi::External<TapState>>().Data());
        // The drainer writes batches into this buffer: it must outlive the drainer.
        batch_ = Napi::Persistent(info[1].As<Napi::Object>());
        // Closes the tap when the environment (main thread or worker) is torn down without
        // close().
        napi_add_env_cleanup_hook(env_, &TapHandle::onEnvTeardown, this);
    }

    ~TapHandle() override { shutdown(); }

  private:
    static void onEnvTeardown(void *self) {
        auto *handle = static_cast<TapHandle *>(self);
        handle->state_.reset();
    }

    void shutdown() {
        if (!state_)
            return;
        napi_remove_env_cleanup_hook(env_, &TapHandle::onEnvTeardown, this);
        state_.reset();
    }

    TapState &state() {
        if (!state_)
            fail("CLOSED", "the tap is closed");
        return *state_;
    }

    Napi::Value subscribe(const Napi::CallbackInfo &info) {
        return guarded(info.Env(), [&] {
            state().setPort(portArg(info), true);
            return info.Env().Undefined();
        });
    }

    Napi::Value unsubscribe(const Napi::CallbackInfo &info) {
        return guarded(info.Env(), [&] {
            state().setPort(portArg(info), false);
            return info.Env().Undefined();
        });
    }

    // [segmentsCopied, bytesCopied, segmentsDropped, bytesDropped]; zeros once closed.
    Napi::Value counters(const Napi::CallbackInfo &info) {
        tap_counters c = state_ ? state_->counters() : tap_counters{};
        auto out = Napi::Array::New(info.Env(), 4);
        out.Set(0u, static_cast<double>(c.segments_copied));
        out.Set(1u, static_cast<double>(c.bytes_copied));
        out.Set(2u, static_cast<double>(c.segments_dropped));
        out.Set(3u, static_cast<double>(c.bytes_dropped));
        return out;
    }

    Napi::Value pause(const Napi::CallbackInfo &info) {
        if (state_)
            state_->pause();
        return info.Env().Undefined();
    }

    Napi::Value resume(const Napi::CallbackInfo &info) {
        if (state_)
            state_->resume();
        return info.Env().Undefined();
    }

    Napi::Value close(const Napi::CallbackInfo &info) {
        shutdown();
        return info.Env().Undefined();
    }

    napi_env env_;
    Napi::ObjectReference batch_;
    std::unique_ptr<TapState> state_;
};

// deferToTarget() => number of threads changed. Puts every thread of this process (and so the
// threads it starts later, which inherit it) under SCHED_BATCH: same weight as any task, so the
// agent still gets its fair share of a busy node and loses nothing (nice 19 did: starved, it
// lost data), but its wakeups no longer preempt the target in the middle of a request; it runs
// when the target blocks or its slice ends. No privilege is needed for SCHED_BATCH.
Napi::Value deferToTarget(const Napi::CallbackInfo &info) {
    auto env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
        DIR *tasks = opendir("/proc/self/task");
        if (tasks == nullptr)
            fail("SCHED_FAILED",
                 std::string("cannot list this process's threads: ") + std::strerror(errno));
        sched_param param{};
        int changed = 0;
        int error = 0;
        while (dirent *entry = readdir(tasks)) {
            if (entry->d_name[0] == '.')
                continue;
            pid_t tid = static_cast<pid_t>(std::strtol(entry->d_name, nullptr, 10));
            if (sched_setscheduler(tid, SCHED_BATCH, &param) == 0)
                changed++;
            else if (errno != ESRCH) // a thread that ended meanwhile
                error = errno;
        }
        closedir(tasks);
        if (error != 0)
            fail("SCHED_FAILED", std::string("cannot set SCHED_BATCH: ") + std::strerror(error));
        return Napi::Number::New(env, changed);
    });
}

// open(target: {pid} | {netns}, onBatch: (length: number) => void,
//      ringBufferBytes: number, attachMode: 'auto' | 'tcx' | 'tc', batch: Buffer)
//      => TapHandle & { attachMode, interfaces, pause(), resume() }
Napi::Value openTap(const Napi::CallbackInfo &info) {
    auto env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
        if (!info[0].IsObject() || !info[1].IsFunction() || !info[2].IsNumber() ||
            !info[3].IsString() || !info[4].IsBuffer())
            fail("BAD_ARGUMENT", "open(target, onBatch, ringBufferBytes, attachMode, batch)");
        auto batch = info[4].As<Napi::Buffer<uint8_t>>();
        if (batch.Length() < kMinBatchBytes)
            fail("BAD_ARGUMENT", "batch must be a Buffer of at least 128 KiB");
        double ring = info[2].As<Napi::Number>().DoubleValue();
        // The kernel wants a power of 2 multiple of the page size; from 256 KiB up, any power of
        // 2 is one on every page size Linux uses.
        if (!(ring >= kMinRingBytes && ring <= kMaxRingBytes) ||
            (static_cast<size_t>(ring) & (static_cast<size_t>(ring) - 1)) != 0)
            fail("BAD_ARGUMENT", "ringBufferBytes must be a power of 2 from 256 KiB to 1 GiB");
        std::string modeName = info[3].As<Napi::String>().Utf8Value();
        Mode mode;
        if (modeName == "auto")
            mode = Mode::Auto;
        else if (modeName == "tcx")
            mode = Mode::Tcx;
        else if (modeName == "tc")
            mode = Mode::Tc;
        else
            fail("BAD_ARGUMENT", "attachMode must be 'auto', 'tcx' or 'tc'");

        auto state = TapState::open(env, info[0].As<Napi::Object>(), info[1].As<Napi::Function>(),
                                    static_cast<size_t>(ring), mode, batch.Data(), batch.Length());
        auto ifaces = Napi::Array::New(env, state->interfaces().size());
        for (size_t i = 0; i < state->interfaces().size(); i++) {
            auto entry = Napi::Object::New(env);
            entry.Set("ifindex", state->interfaces()[i].ifindex);
            entry.Set("name", state->interfaces()[i].name);
            ifaces.Set(static_cast<uint32_t>(i), entry);
        }
        auto modeValue = Napi::String::New(env, state->tcMode() ? "tc" : "tcx");
        auto *ctor = env.GetInstanceData<Napi::FunctionReference>();
        auto handle = ctor->New({Napi::External<TapState>::New(env, state.release()), batch});
        handle.Set("attachMode", modeValue);
        handle.Set("interfaces", ifaces);
        return handle;
    });
}

// libbpf reports expected conditions (an existing clsact qdisc, a kernel without TCX) as
// warnings on stderr; the agent's errors carry the cause instead, and the log is on request.
int libbpfPrint(enum libbpf_print_level level, const char *format, va_list args) {
    static const bool debug = std::getenv("MIRRORD_TAP_DEBUG") != nullptr;
    return debug && level != LIBBPF_DEBUG ? std::vfprintf(stderr, format, args) : 0;
}

} // namespace

Napi::Object init(Napi::Env env, Napi::Object exports) {
    libbpf_set_print(libbpfPrint);
    auto *ctor = new Napi::FunctionReference(Napi::Persistent(TapHandle::define(env)));
    env.SetInstanceData(ctor);
    exports.Set("open", Napi::Function::New<openTap>(env, "open"));
    exports.Set("deferToTarget", Napi::Function::New<deferToTarget>(env, "deferToTarget"));
    return exports;
}

NODE_API_MODULE(mirrord_tap, init)
