// Enters a network namespace on the calling thread: the agent's main thread, once its session's
// listener is open (a socket stays in the namespace it was made in), so that every socket Node
// makes from then on (net, dgram) is the target's, with its addresses, routes and policies.
// setns(CLONE_NEWNET) changes only the calling thread; libuv's pool threads stay where they were.
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <napi.h>

namespace {

Napi::Value EnterNetns(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (info.Length() != 1 || !info[0].IsString()) {
        throw Napi::TypeError::New(env, "enterNetns(path: string)");
    }
    std::string path = info[0].As<Napi::String>();
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        throw Napi::Error::New(env, "cannot open " + path + ": " + strerror(errno));
    }
    int rc = setns(fd, CLONE_NEWNET);
    int error = errno;
    close(fd);
    if (rc != 0) {
        throw Napi::Error::New(env, "cannot enter the network namespace " + path + ": " +
                                        strerror(error));
    }
    return env.Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
    exports.Set("enterNetns", Napi::Function::New(env, EnterNetns));
    return exports;
}

} // namespace

NODE_API_MODULE(mirrord_netns, Init)
