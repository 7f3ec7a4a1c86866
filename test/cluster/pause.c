/* The test cluster's pod sandbox process (containerd's sandbox_image), built by images.sh
 * because no registry serves registry.k8s.io/pause here. Like Kubernetes' own pause: it holds
 * the pod's namespaces while sleeping, reaps the zombies it inherits as the pod's PID 1, and
 * exits 0 when asked to stop. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stop_action = {.sa_handler = stop};
    struct sigaction reap_action = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    if (sigaction(SIGINT, &stop_action, NULL) < 0 || sigaction(SIGTERM, &stop_action, NULL) < 0 ||
        sigaction(SIGCHLD, &reap_action, NULL) < 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
