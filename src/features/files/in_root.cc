// Opens a path of another process's file system the way that process would resolve it:
// openat2(2) from its root (/proc/PID/root) with RESOLVE_IN_ROOT, so that `..` and absolute
// symlinks stay inside it, and RESOLVE_NO_MAGICLINKS, so that /proc/*/root and /proc/*/fd
// links cannot lead out of it. Node's fs has no openat2; everything after the open (fstat,
// read, readdir through /proc/self/fd) is done by Node on the descriptor returned here.
#include <cerrno>
#include <fcntl.h>
#include <linux/openat2.h>
#include <napi.h>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

// Runs openat2 on libuv's thread pool: a slow volume must not stall the agent's mirroring.
class OpenWorker : public Napi::AsyncWorker {
  public:
    OpenWorker(Napi::Env env, std::string root, std::string path, int flags)
        : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)),
          root_(std::move(root)), path_(std::move(path)), flags_(flags) {}

    Napi::Promise promise() { return deferred_.Promise(); }

    void Execute() override {
        int rootFd = open(root_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (rootFd < 0) {
            result_ = -errno;
            return;
        }
        struct open_how how = {};
        how.flags = static_cast<unsigned long long>(flags_) | O_CLOEXEC;
        how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
        long fd = syscall(SYS_openat2, rootFd, path_.c_str(), &how, sizeof how);
        result_ = fd < 0 ? -errno : static_cast<int>(fd);
        close(rootFd);
    }

    void OnOK() override { deferred_.Resolve(Napi::Number::New(Env(), result_)); }

  private:
    Napi::Promise::Deferred deferred_;
    std::string root_;
    std::string path_;
    int flags_;
    int result_ = 0;
};

// openInRoot(root, path, flags): a promise of the descriptor, or of -errno.
Napi::Value OpenInRoot(const Napi::CallbackInfo &info) {
    auto *worker = new OpenWorker(info.Env(), info[0].As<Napi::String>().Utf8Value(),
                                  info[1].As<Napi::String>().Utf8Value(),
                                  info[2].As<Napi::Number>().Int32Value());
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
