/*
 * sidecar-runner: the only program of ours that runs inside a user's image.
 *
 * Static, no libc beyond what gcc -static links, no shell needed. Two modes:
 *
 *   sidecar-runner keepalive
 *       Sleeps until signalled. It is the container's main process (docker-init
 *       is PID 1 and reaps orphans), so the sidecar stays up between actions.
 *
 *   sidecar-runner run ACTION_DIR TIMEOUT_MS WORKDIR -- ARGV...
 *       Runs one action. See sidecar/README.md for the full contract: output in
 *       ACTION_DIR/stdout and ACTION_DIR/stderr, the outcome in
 *       ACTION_DIR/runner.status, our PID in ACTION_DIR/runner.pid.
 *
 *   sidecar-runner cancel ACTION_DIR
 *       Asks the runner of that action to kill it (SIGTERM to the runner).
 *
 * Why a runner at all: `docker exec` cannot kill what it started, and processes
 * that call setsid() escape every process-group kill. The runner makes itself
 * a child subreaper, so every process the action leaves behind is re-parented
 * to it, and it kills and reaps all of them before it reports.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_RUNNER_ERROR 125
#define EXIT_TIMEOUT 124
#define CLEANUP_BUDGET_MS 5000

static char status_path[4096];

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_file_atomically(const char *path, const char *text) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len) {
        close(fd);
        return -1;
    }
    close(fd);
    return rename(tmp, path);
}

/*
 * The container's count of OOM kills, from its memory cgroup (v1 memory.oom_control or
 * v2 memory.events, both "oom_kill N"); -1 if neither is readable. Compared before and
 * after the action, because an OOM kill of an exec'd process is not in the container state.
 */
static long oom_kills(void) {
    static const char *paths[] = {"/sys/fs/cgroup/memory/memory.oom_control",
                                  "/sys/fs/cgroup/memory.events"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        FILE *file = fopen(paths[i], "re");
        if (!file) continue;
        char key[64];
        long value;
        while (fscanf(file, "%63s %ld", key, &value) == 2) {
            if (strcmp(key, "oom_kill") == 0) {
                fclose(file);
                return value;
            }
        }
        fclose(file);
    }
    return -1;
}

static long oom_kills_before = -1;

/* Writes "key=value" lines the worker parses; the last word wins if run twice. */
static void report(const char *outcome, int code, int strays) {
    long after = oom_kills();
    long oom = (oom_kills_before >= 0 && after >= 0) ? after - oom_kills_before : 0;
    char text[256];
    snprintf(text, sizeof text, "outcome=%s\ncode=%d\nstrays_killed=%d\noom_kills=%ld\n",
             outcome, code, strays, oom);
    if (write_file_atomically(status_path, text) != 0) {
        fprintf(stderr, "sidecar-runner: cannot write %s: %s\n", status_path, strerror(errno));
    }
}

/* Parent PID of a live process, from /proc/PID/stat; -1 if it is gone or a zombie. */
static pid_t parent_of(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = '\0';
    /* The command name may hold spaces and parentheses: parse after the last ')'. */
    char *end = strrchr(buf, ')');
    if (!end) return -1;
    char state;
    int ppid;
    if (sscanf(end + 1, " %c %d", &state, &ppid) != 2 || state == 'Z') return -1;
    return (pid_t)ppid;
}

/* SIGKILLs every process whose parent is us; returns how many it signalled,
 * not counting the action's main process. */
static int kill_children(pid_t main_child) {
    DIR *proc = opendir("/proc");
    if (!proc) return 0;
    pid_t self = getpid();
    int killed = 0;
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || pid <= 0 || pid == self) continue;
        if (parent_of((pid_t)pid) == self && kill((pid_t)pid, SIGKILL) == 0 && pid != main_child)
            killed++;
    }
    closedir(proc);
    return killed;
}

/*
 * Kills the action's process group and then, until none is left, every
 * process re-parented to us. Returns the number of strays found after the
 * main process ended, or -1 if some could not be reaped within the budget.
 */
static int kill_everything(pid_t group) {
    int strays = 0;
    kill(-group, SIGKILL);
    long long deadline = now_ms() + CLEANUP_BUDGET_MS;
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        int found = kill_children(group);
        strays += found;
        if (found == 0) {
            /* Nothing left to signal: block until the last children are reaped. */
            if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) return strays;
        }
        if (now_ms() > deadline) return -1;
        struct timespec pause = {0, 2 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

static int open_output(const char *dir, const char *name) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

static int run_action(const char *action_dir, long long timeout_ms, const char *workdir,
                      char **argv) {
    snprintf(status_path, sizeof status_path, "%s/runner.status", action_dir);
    char pid_path[4200], pid_text[32];
    snprintf(pid_path, sizeof pid_path, "%s/runner.pid", action_dir);
    snprintf(pid_text, sizeof pid_text, "%d\n", (int)getpid());
    write_file_atomically(pid_path, pid_text);

    oom_kills_before = oom_kills();
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
        report("runner_error", errno, 0);
        return EXIT_RUNNER_ERROR;
    }
    int out = open_output(action_dir, "stdout");
    int err = open_output(action_dir, "stderr");
    if (out < 0 || err < 0) {
        report("runner_error", errno, 0);
        return EXIT_RUNNER_ERROR;
    }

    sigset_t handled, previous;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGHUP);
    sigprocmask(SIG_BLOCK, &handled, &previous);

    pid_t child = fork();
    if (child < 0) {
        report("runner_error", errno, 0);
        return EXIT_RUNNER_ERROR;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &previous, NULL);
        setsid();
        int null_fd = open("/dev/null", O_RDONLY);
        if (null_fd >= 0) dup2(null_fd, 0);
        dup2(out, 1);
        dup2(err, 2);
        if (chdir(workdir) != 0) {
            dprintf(2, "sidecar-runner: cannot enter working directory %s: %s\n", workdir,
                    strerror(errno));
            _exit(EXIT_RUNNER_ERROR);
        }
        execvp(argv[0], argv);
        int code = errno == ENOENT ? 127 : 126;
        dprintf(2, "sidecar-runner: cannot execute %s: %s\n", argv[0], strerror(errno));
        _exit(code);
    }
    close(out);
    close(err);

    long long deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
    const char *outcome = NULL;
    int code = 0;
    while (!outcome) {
        siginfo_t info;
        int sig;
        if (deadline) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                outcome = "timeout";
                code = EXIT_TIMEOUT;
                break;
            }
            struct timespec wait_for = {left / 1000, (left % 1000) * 1000000};
            sig = sigtimedwait(&handled, &info, &wait_for);
        } else {
            sig = sigwaitinfo(&handled, &info);
        }
        if (sig < 0) continue; /* EAGAIN (deadline passed) or EINTR: loop re-checks. */
        if (sig == SIGCHLD) {
            int wstatus;
            pid_t pid;
            while ((pid = waitpid(-1, &wstatus, WNOHANG)) > 0) {
                if (pid != child) continue;
                if (WIFEXITED(wstatus)) {
                    outcome = "exited";
                    code = WEXITSTATUS(wstatus);
                } else {
                    outcome = "signaled";
                    code = WTERMSIG(wstatus);
                }
            }
        } else {
            outcome = "cancelled";
            code = sig;
        }
    }
    int strays = kill_everything(child);
    if (strays < 0) {
        report("unclean", code, 0);
        return EXIT_RUNNER_ERROR;
    }
    report(outcome, code, strays);
    if (strcmp(outcome, "exited") == 0) return code;
    if (strcmp(outcome, "signaled") == 0) return 128 + code;
    if (strcmp(outcome, "timeout") == 0) return EXIT_TIMEOUT;
    return 128 + code;
}

static int cancel_action(const char *action_dir) {
    char pid_path[4200], buf[32];
    snprintf(pid_path, sizeof pid_path, "%s/runner.pid", action_dir);
    int fd = open(pid_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1; /* Not started yet, or already finished. */
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = '\0';
    pid_t pid = (pid_t)atoi(buf);
    if (pid <= 1) return 1;
    return kill(pid, SIGTERM) == 0 ? 0 : 1;
}

static int usage(void) {
    fprintf(stderr,
            "usage: sidecar-runner keepalive\n"
            "       sidecar-runner run ACTION_DIR TIMEOUT_MS WORKDIR -- ARGV...\n"
            "       sidecar-runner cancel ACTION_DIR\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "keepalive") == 0) {
        for (;;) pause();
    }
    if (argc >= 3 && strcmp(argv[1], "cancel") == 0) return cancel_action(argv[2]);
    if (argc >= 7 && strcmp(argv[1], "run") == 0 && strcmp(argv[5], "--") == 0) {
        char *end;
        long long timeout_ms = strtoll(argv[3], &end, 10);
        if (*end != '\0' || timeout_ms < 0) return usage();
        return run_action(argv[2], timeout_ms, argv[4], &argv[6]);
    }
    return usage();
}
