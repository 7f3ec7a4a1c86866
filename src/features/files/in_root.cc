// Opens a path of another process's file system the way that process would resolve it:
// openat2(2) from its root (/proc/PID/root) with RESOLVE_IN_ROOT, so that `..` and absolute
// symlinks stay inside it, and RESOLVE_NO_MAGICLINKS, so that /proc/*/root and /proc/*/fd
// links cannot lead out of it. Node's fs has no openat2. The open, its fstat and, for a file
// being read, its first bytes are one trip to libuv's thread pool: a small file costs the agent
// one hop instead of four, and a slow volume never stalls the agent's mirroring.
#include <cerrno>
#include <cstdlib>
#include <fcntl.h>
#include <linux/openat2.h>
#include <napi.h>
#include <string>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

// What openInRoot does after the open.
enum After {
    kKeep = 0, // return the descriptor (and its stat)
    kStat = 1, // return the stat, close
    kHead = 2, // return the stat and the first `headBytes`; close when that was all of it
};

class OpenWorker : public Napi::AsyncWorker {
  public:
    OpenWorker(Napi::Env env, std::string root, std::string path, int flags, int after,
               size_t headBytes)
        : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)),
          root_(std::move(root)), path_(std::move(path)), flags_(flags), after_(after),
          headBytes_(headBytes) {}

    ~OpenWorker() override { free(head_); }

    Napi::Promise promise() { return deferred_.Promise(); }

    void Execute() override {
        int rootFd = open(root_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (rootFd < 0) {
            errno_ = errno;
            return;
        }
        struct open_how how = {};
        how.flags = static_cast<unsigned long long>(flags_) | O_CLOEXEC;
        how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
        long fd = syscall(SYS_openat2, rootFd, path_.c_str(), &how, sizeof how);
        errno_ = fd < 0 ? errno : 0;
        close(rootFd);
        if (fd < 0)
            return;
        fd_ = static_cast<int>(fd);
        if (fstat(fd_, &stat_) != 0) {
            fail(errno);
            return;
        }
        if (after_ == kStat) {
            closeFd();
            return;
        }
        if (after_ != kHead)
            return;
        if (S_ISDIR(stat_.st_mode)) {
            fail(EISDIR);
            return;
        }
        // As much as the file holds and one byte more, which tells that it was all of it (and
        // a small file costs no MiB of memory until the GC frees its Buffer). A size of 0 may
        // be a file of /proc or /sys, whose size is unknown until read: those get headBytes.
        const size_t size = static_cast<size_t>(stat_.st_size);
        const size_t want = size > 0 && size < headBytes_ ? size + 1 : headBytes_;
        head_ = static_cast<char *>(malloc(want > 0 ? want : 1));
        if (!head_) {
            fail(ENOMEM);
            return;
        }
        while (headLength_ < want) {
            ssize_t n = pread(fd_, head_ + headLength_, want - headLength_,
                              static_cast<off_t>(headLength_));
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                fail(errno);
                return;
            }
            if (n == 0)
                break;
            headLength_ += static_cast<size_t>(n);
        }
        // A short read is the end: nothing is left to read by descriptor. A file that grew
        // since its stat fills `want`, and is read on by descriptor.
        if (headLength_ < want)
            closeFd();
    }

    void OnOK() override {
        Napi::Env env = Env();
        Napi::Object result = Napi::Object::New(env);
        if (errno_ != 0) {
            result.Set("errno", -errno_);
            deferred_.Resolve(result);
            return;
        }
        result.Set("fd", fd_);
        Napi::Array stat = Napi::Array::New(env, 13);
        const double fields[] = {
            double(stat_.st_mode),         double(stat_.st_size),
            double(stat_.st_uid),          double(stat_.st_gid),
            double(stat_.st_ino),          double(stat_.st_nlink),
            double(stat_.st_dev),          double(stat_.st_atim.tv_sec),
            double(stat_.st_atim.tv_nsec), double(stat_.st_mtim.tv_sec),
            double(stat_.st_mtim.tv_nsec), double(stat_.st_ctim.tv_sec),
            double(stat_.st_ctim.tv_nsec),
        };
        for (uint32_t i = 0; i < 13; i++)
            stat.Set(i, fields[i]);
        result.Set("stat", stat);
        if (head_) {
            char *bytes = head_;
            head_ = nullptr; // the Buffer owns it now
            result.Set("head", Napi::Buffer<char>::New(env, bytes, headLength_,
                                                       [](Napi::Env, char *data) { free(data); }));
        }
        deferred_.Resolve(result);
    }

  private:
    void closeFd() {
        close(fd_);
        fd_ = -1;
    }

    void fail(int error) {
        errno_ = error;
        closeFd();
    }

    Napi::Promise::Deferred deferred_;
    std::string root_;
    std::string path_;
    int flags_;
    int after_;
    size_t headBytes_;
    int errno_ = 0;
    int fd_ = -1;
    struct stat stat_ = {};
    char *head_ = nullptr;
    size_t headLength_ = 0;
};

// openInRoot(root, path, flags, after, headBytes): a promise of { errno } (negative) or
// { fd, stat, head? }; `fd` is -1 once closed (see After).
Napi::Value OpenInRoot(const Napi::CallbackInfo &info) {
    auto *worker = new OpenWorker(
        info.Env(), info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::String>().Utf8Value(),
        info[2].As<Napi::Number>().Int32Value(), info[3].As<Napi::Number>().Int32Value(),
        static_cast<size_t>(info[4].As<Napi::Number>().Int64Value()));
    Napi::Promise promise = worker->promise();
    worker->Queue();
    return promise;
}

// readLinkAt(fd): the target of the symlink that `fd` (O_PATH | O_NOFOLLOW) is, or -errno.
Napi::Value ReadLinkAt(const Napi::CallbackInfo &info) {
    int fd = info[0].As<Napi::Number>().Int32Value();
    std::string target(4096, '\0');
    ssize_t length = readlinkat(fd, "", target.data(), target.size());
    if (length < 0)
        return Napi::Number::New(info.Env(), -errno);
    target.resize(static_cast<size_t>(length));
    return Napi::String::New(info.Env(), target);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
    exports.Set("openInRoot", Napi::Function::New(env, OpenInRoot));
    exports.Set("readLinkAt", Napi::Function::New(env, ReadLinkAt));
    return exports;
}

} // namespace

NODE_API_MODULE(mirrord_files, Init)
