/*
 * sidecar-runner: the only program of ours that runs inside a user's image.
 *
 * Static, no shell needed. Four modes (full contract in sidecar/README.md):
 *
 *   sidecar-runner keepalive
 *       Sleeps until signalled: the sidecar's main process under docker-init.
 *
 *   sidecar-runner run CONTROL_DIR UID GID TIMEOUT_MS WORKDIR OPTIONS -- ARGV...
 *       Runs one action as UID:GID. Started as root by the worker's exec. Its
 *       output files, PID and report live in CONTROL_DIR, a root-only directory
 *       the worker made outside the action's tree, so the action can neither
 *       forge the report nor swap the files for links.
 *
 *   sidecar-runner cancel CONTROL_DIR
 *       Asks the runner of that action to kill it (SIGTERM to the runner).
 *
 *   sidecar-runner agent AGENT_DIR
 *       The sidecar's main process instead of keepalive: serves the worker on
 *       AGENT_DIR/agent.sock and runs each requested action exactly as `run`
 *       does, in a handler forked per connection, without a `docker exec` each.
 *
 * Why a runner at all: `docker exec` cannot kill what it started, and processes
 * that call setsid() escape every process-group kill. The runner makes itself a
 * child subreaper, so every process the action leaves behind is re-parented to
 * it, and it kills and reaps all of them before it reports. It runs as root and
 * only the forked child drops to the action's user, so the action cannot signal
 * or trace the runner.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_RUNNER_ERROR 125
#define EXIT_TIMEOUT 124
#define CLEANUP_BUDGET_MS 5000
#define SCRUB_MAX_DEPTH 256
#define MAX_GROUPS 64

/* Where an action may leave state outside its own directory; emptied after every action
 * of a reusable sidecar (whose root filesystem is read-only). */
static const char *const SCRUBBED_DIRS[] = {"/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue"};

static int control_fd = -1;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Writes NAME in the control directory atomically (temp file + rename, never following links). */
static int write_control_file(const char *name, const char *text) {
    char tmp[64];
    snprintf(tmp, sizeof tmp, ".%s.tmp", name);
    unlinkat(control_fd, tmp, 0);
    int fd = openat(control_fd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    size_t len = strlen(text);
    ssize_t written = write(fd, text, len);
    close(fd);
    if (written != (ssize_t)len) return -1;
    return renameat(control_fd, tmp, control_fd, name);
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

struct report {
    const char *outcome;
    int code;
    int strays;
    int survivors;
    int scrubbed;
};

/* Writes "key=value" lines the worker parses; see sidecar/README.md. */
static void write_report(const struct report *r) {
    long after = oom_kills();
    long oom = (oom_kills_before >= 0 && after >= 0) ? after - oom_kills_before : 0;
    char text[256];
    snprintf(text, sizeof text,
             "outcome=%s\ncode=%d\nstrays_killed=%d\nsurvivors=%d\noom_kills=%ld\nscrubbed=%d\n",
             r->outcome, r->code, r->strays, r->survivors, oom, r->scrubbed);
    if (write_control_file("status", text) != 0) {
        fprintf(stderr, "sidecar-runner: cannot write its report: %s\n", strerror(errno));
    }
}

/* Reads /proc/PID/NAME into buf (NUL-terminated); false if the process is gone. */
static int read_proc(pid_t pid, const char *name, char *buf, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    return 1;
}

/* The parent PID of a live process, from /proc/PID/stat; -1 if it is gone or a zombie. */
static pid_t parent_of(pid_t pid) {
    char buf[512];
    if (!read_proc(pid, "stat", buf, sizeof buf)) return -1;
    /* The command name may hold spaces and parentheses: parse after the last ')'. */
    char *end = strrchr(buf, ')');
    if (!end) return -1;
    char state;
    int ppid;
    if (sscanf(end + 1, " %c %d", &state, &ppid) != 2 || state == 'Z') return -1;
    return (pid_t)ppid;
}

/* The real uid of a live process, from /proc/PID/status; -1 if unknown. */
static long uid_of(pid_t pid) {
    char buf[4096];
    if (!read_proc(pid, "status", buf, sizeof buf)) return -1;
    char *line = strstr(buf, "\nUid:");
    if (!line) return -1;
    char *state = strstr(buf, "\nState:");
    if (state && (state[8] == 'Z' || state[8] == 'X')) return -1;
    return strtol(line + 5, NULL, 10);
}

typedef int (*process_filter)(pid_t pid, long arg);

static int is_our_child(pid_t pid, long self) { return parent_of(pid) == (pid_t)self; }

static int runs_as(pid_t pid, long uid) { return uid_of(pid) == uid; }

/* SIGKILLs every process of this PID namespace that `filter` selects; returns how many,
 * not counting `skip`. */
static int kill_matching(process_filter filter, long arg, pid_t skip) {
    DIR *proc = opendir("/proc");
    if (!proc) return 0;
    pid_t self = getpid();
    int killed = 0;
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || pid <= 1 || pid == self) continue;
        if (filter((pid_t)pid, arg) && kill((pid_t)pid, SIGKILL) == 0 && pid != skip) killed++;
    }
    closedir(proc);
    return killed;
}

/*
 * Kills the action's process group and then, until none is left, every process
 * re-parented to us. Returns the number of strays found after the main process
 * ended, or -1 if some could not be reaped within the budget.
 */
static int kill_everything(pid_t group) {
    int strays = 0;
    kill(-group, SIGKILL);
    long long deadline = now_ms() + CLEANUP_BUDGET_MS;
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        int found = kill_matching(is_our_child, (long)getpid(), group);
        strays += found;
        if (found == 0 && waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) return strays;
        if (now_ms() > deadline) return -1;
        struct timespec pause = {0, 2 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

/* ----------------------------------------------------------------- scrubbing */

enum { GONE = 0, KEPT_MOUNT = 1, FAILED = 2 };

/* Empties the directory open at `fd` (same device `dev` only, never following a link).
 * Entries on another device are mount points: kept, and so are their parents. */
static int empty_directory(int fd, dev_t dev, int depth) {
    if (depth > SCRUB_MAX_DEPTH) return FAILED;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return FAILED;
    }
    int result = GONE;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) continue;
        struct stat info;
        if (fstatat(dirfd(dir), name, &info, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno != ENOENT) result = FAILED;
            continue;
        }
        if (info.st_dev != dev) {
            if (result == GONE) result = KEPT_MOUNT;
            continue;
        }
        if (S_ISDIR(info.st_mode)) {
            int child = openat(dirfd(dir), name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (child < 0) {
                result = FAILED;
                continue;
            }
            int inner = empty_directory(child, dev, depth + 1);
            if (inner == GONE) {
                if (unlinkat(dirfd(dir), name, AT_REMOVEDIR) != 0) result = FAILED;
            } else if (inner > result) {
                result = inner;
            }
        } else if (unlinkat(dirfd(dir), name, 0) != 0) {
            result = FAILED;
        }
    }
    closedir(dir);
    return result;
}

/* Removes every SysV shared memory segment, semaphore set and message queue of this
 * IPC namespace (the sidecar's own). Returns 0 if none is left. */
static int scrub_sysv_ipc(void) {
    static const char *tables[] = {"/proc/sysvipc/shm", "/proc/sysvipc/sem", "/proc/sysvipc/msg"};
    int failed = 0;
    for (int t = 0; t < 3; t++) {
        FILE *file = fopen(tables[t], "re");
        if (!file) continue;
        char line[512];
        if (!fgets(line, sizeof line, file)) { /* header */
            fclose(file);
            continue;
        }
        while (fgets(line, sizeof line, file)) {
            long key, id;
            if (sscanf(line, "%ld %ld", &key, &id) != 2) continue;
            int rc = t == 0 ? shmctl((int)id, IPC_RMID, NULL)
                     : t == 1 ? semctl((int)id, 0, IPC_RMID)
                              : msgctl((int)id, IPC_RMID, NULL);
            if (rc != 0 && errno != EINVAL && errno != EIDRM) failed = 1;
        }
        fclose(file);
    }
    return failed;
}

/* Empties the places an action could leave state in; 1 if all are clean. */
static int scrub(void) {
    int clean = 1;
    for (size_t i = 0; i < sizeof SCRUBBED_DIRS / sizeof SCRUBBED_DIRS[0]; i++) {
        int fd = open(SCRUBBED_DIRS[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) continue; /* Not in this image (a read-only root cannot gain it). */
        struct stat info;
        if (fstat(fd, &info) != 0) {
            close(fd);
            clean = 0;
            continue;
        }
        if (empty_directory(fd, info.st_dev, 0) == FAILED) clean = 0;
    }
    if (scrub_sysv_ipc() != 0) clean = 0;
    return clean;
}

/* ------------------------------------------------------------ becoming the user */

/* The image's supplementary groups of the user with this uid, as `docker exec -u` adds
 * them: every group in /etc/group that lists the uid's name from /etc/passwd. */
static int supplementary_groups(uid_t uid, gid_t gid, gid_t *groups) {
    int count = 0;
    groups[count++] = gid;
    char name[256] = "";
    FILE *passwd = fopen("/etc/passwd", "re");
    if (passwd) {
        char line[1024];
        while (fgets(line, sizeof line, passwd)) {
            char *fields[4] = {0};
            char *cursor = line;
            for (int i = 0; i < 4 && cursor; i++) fields[i] = strsep(&cursor, ":");
            if (fields[2] && strtoul(fields[2], NULL, 10) == uid &&
                strspn(fields[2], "0123456789") == strlen(fields[2])) {
                snprintf(name, sizeof name, "%s", fields[0]);
                break;
            }
        }
        fclose(passwd);
    }
    if (!name[0]) return count;
    FILE *group = fopen("/etc/group", "re");
    if (!group) return count;
    char line[4096];
    while (fgets(line, sizeof line, group) && count < MAX_GROUPS) {
        line[strcspn(line, "\n")] = '\0';
        char *fields[4] = {0};
        char *cursor = line;
        for (int i = 0; i < 4 && cursor; i++) fields[i] = strsep(&cursor, ":");
        if (!fields[2] || !fields[3]) continue;
        char *members = fields[3];
        char *member;
        while ((member = strsep(&members, ",")) != NULL) {
            if (strcmp(member, name) == 0) {
                gid_t extra = (gid_t)strtoul(fields[2], NULL, 10);
                if (extra != gid) groups[count++] = extra;
                break;
            }
        }
    }
    fclose(group);
    return count;
}

/* Becomes uid:gid. For a non-root uid every capability goes (bounding, inheritable,
 * ambient; permitted and effective go with the uid change), and no exec can gain any. */
static int become(uid_t uid, gid_t gid) {
    gid_t groups[MAX_GROUPS];
    int count = supplementary_groups(uid, gid, groups);
    if (uid != 0) {
        for (int cap = 0; cap <= 63; cap++) {
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno == EINVAL) break;
        }
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    }
    if (setgroups((size_t)count, groups) != 0) return -1;
    if (setresgid(gid, gid, gid) != 0) return -1;
    if (setresuid(uid, uid, uid) != 0) return -1;
    if (uid != 0) {
        struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct data[2];
        memset(data, 0, sizeof data);
        if (syscall(SYS_capset, &header, data) != 0) return -1;
    }
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

static int open_output(const char *name) {
    unlinkat(control_fd, name, 0);
    return openat(control_fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
}

static int has_option(const char *options, const char *wanted) {
    char copy[128];
    snprintf(copy, sizeof copy, "%s", options);
    char *cursor = copy, *word;
    while ((word = strsep(&cursor, ",")) != NULL) {
        if (strcmp(word, wanted) == 0) return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ one action */

/* One action, as `run` takes it from its argv and `agent` from a request. */
struct action {
    const char *control_dir;
    uid_t uid;
    gid_t gid;
    long long timeout_ms; /* 0: none */
    const char *workdir;
    const char *options;
    char **argv;
    char **envp; /* the action's whole environment */
};

/* How the wait for the action's main process ended. */
struct ending {
    const char *outcome;
    int code;
};

/* The forked child: becomes the action, or exits with run's set-up codes and a message in
 * its stderr. `mask` is the signal mask the runner had before it blocked its own. */
/*
 * Every signal back to its default action, through the system call itself: libc refuses the
 * signals it reserves for its own use (32 and 33), yet an ignored one of those would be
 * inherited too. SIG_DFL is 0, so an all-zero kernel sigaction means "default, no flags, no
 * mask" whatever the architecture's layout of the structure.
 */
static void reset_signal_dispositions(void) {
    unsigned long defaults[4] = {0, 0, 0, 0};
    for (int sig = 1; sig <= 64; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, defaults, NULL, sizeof(unsigned long));
    }
}

static _Noreturn void start_action(const struct action *a, int out, int err,
                                   const sigset_t *mask) {
    sigprocmask(SIG_SETMASK, mask, NULL);
    /* An ignored signal stays ignored across exec. The agent ignores SIGPIPE and SIGCHLD, and
     * whoever started the runner may have ignored others (a shell ignores SIGINT and SIGQUIT
     * for background jobs); an action under `docker exec` starts with none ignored. */
    reset_signal_dispositions();
    setsid();
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd > 0) { /* 0 already if the runner had no stdin */
        dup2(null_fd, 0);
        close(null_fd); /* not one more open fd for the action */
    }
    dup2(out, 1);
    dup2(err, 2);
    close(control_fd);
    if (become(a->uid, a->gid) != 0) {
        dprintf(2, "sidecar-runner: cannot become %u:%u: %s\n", (unsigned)a->uid,
                (unsigned)a->gid, strerror(errno));
        _exit(EXIT_RUNNER_ERROR);
    }
    if (chdir(a->workdir) != 0) {
        dprintf(2, "sidecar-runner: cannot enter working directory %s: %s\n", a->workdir,
                strerror(errno));
        _exit(EXIT_RUNNER_ERROR);
    }
    /* execvp searches the PATH of `environ`: the action's own, as Docker's exec does. */
    environ = a->envp;
    execvp(a->argv[0], a->argv);
    int code = errno == ENOENT ? 127 : 126;
    dprintf(2, "sidecar-runner: cannot execute %s: %s\n", a->argv[0], strerror(errno));
    _exit(code);
}

/* Reaps every child that has ended; 1 once the action's main process is among them. */
static int reap_children(pid_t main_pid, struct ending *end) {
    int ended = 0, wstatus;
    pid_t pid;
    while ((pid = waitpid(-1, &wstatus, WNOHANG)) > 0) {
        if (pid != main_pid) continue;
        ended = 1;
        if (WIFEXITED(wstatus)) {
            *end = (struct ending){"exited", WEXITSTATUS(wstatus)};
        } else {
            *end = (struct ending){"signaled", WTERMSIG(wstatus)};
        }
    }
    return ended;
}

/* The monotonic time at which a timeout of `timeout_ms` runs out; 0 for none (also for a
 * timeout so long that the sum would overflow). */
static long long deadline_after(long long timeout_ms) {
    long long start = now_ms();
    return timeout_ms > 0 && timeout_ms <= LLONG_MAX - start ? start + timeout_ms : 0;
}

/*
 * Waits for whichever comes first: the action's main process ending (SIGCHLD), the
 * deadline, a cancel signal (SIGTERM, SIGINT or SIGHUP, all read from `signal_fd`), or, in
 * agent mode, the worker's end of the connection `hangup_fd` ending or sending anything
 * (-1 in run mode: poll ignores a negative fd). A hang-up is a cancel by SIGTERM, so both
 * kinds of cancel report and exit alike.
 */
static struct ending wait_for_action(pid_t child, long long deadline, int signal_fd,
                                     int hangup_fd) {
    struct ending end = {NULL, 0};
    for (;;) {
        int wait_ms = -1;
        if (deadline) {
            long long left = deadline - now_ms();
            if (left <= 0) return (struct ending){"timeout", EXIT_TIMEOUT};
            wait_ms = left > INT_MAX ? INT_MAX : (int)left;
        }
        struct pollfd fds[2] = {{signal_fd, POLLIN, 0}, {hangup_fd, POLLIN, 0}};
        if (poll(fds, 2, wait_ms) < 0) continue; /* EINTR: the loop re-checks the deadline. */
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo info;
            if (read(signal_fd, &info, sizeof info) == (ssize_t)sizeof info) {
                if (info.ssi_signo != SIGCHLD) {
                    return (struct ending){"cancelled", (int)info.ssi_signo};
                }
                if (reap_children(child, &end)) return end;
            }
        }
        if (fds[1].revents) return (struct ending){"cancelled", SIGTERM};
    }
}

/* After the wait: kills and reaps everything the action left, then the optional steps,
 * then the report. Returns the runner's exit code for that report. */
static int finish_action(const struct action *a, pid_t child, struct ending end) {
    struct report r = {end.outcome, end.code, 0, 0, 0};
    r.strays = kill_everything(child);
    if (r.strays < 0) {
        r.outcome = "unclean";
        r.strays = 0;
    }
    /* In a sidecar that runs one action at a time, no process of a non-root action's uid
     * may outlive it, whatever it did to escape the subreaper. */
    if (a->uid != 0 && has_option(a->options, "exclusive")) {
        r.survivors = kill_matching(runs_as, (long)a->uid, 0);
    }
    r.scrubbed = has_option(a->options, "scrub") ? scrub() : 0;
    write_report(&r);
    if (strcmp(r.outcome, "exited") == 0) return end.code;
    if (strcmp(r.outcome, "timeout") == 0) return EXIT_TIMEOUT;
    if (strcmp(r.outcome, "unclean") == 0) return EXIT_RUNNER_ERROR;
    return 128 + end.code;
}

/*
 * Runs one action to its end (sidecar/README.md, `run`) and returns the runner's exit code.
 * Both modes come here: `run` with its own environment and no hang-up fd (-1), the agent's
 * handler with the request's environment and its connection to the worker.
 */
static int run_action(const struct action *a, int hangup_fd) {
    struct report r = {"runner_error", 0, 0, 0, 0};
    control_fd = open(a->control_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (control_fd < 0) {
        fprintf(stderr, "sidecar-runner: cannot open %s: %s\n", a->control_dir, strerror(errno));
        return EXIT_RUNNER_ERROR;
    }
    char pid_text[32];
    snprintf(pid_text, sizeof pid_text, "%d\n", (int)getpid());
    write_control_file("pid", pid_text);

    oom_kills_before = oom_kills();
    int out = open_output("stdout");
    int err = open_output("stderr");
    if (out < 0 || err < 0 || prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
        r.code = errno;
        write_report(&r);
        return EXIT_RUNNER_ERROR;
    }

    /* Blocked before the fork and read from a signalfd, so that neither the child's end nor
     * a cancel can slip in between the fork and the wait. */
    sigset_t handled, previous;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGHUP);
    sigprocmask(SIG_BLOCK, &handled, &previous);
    int signal_fd = signalfd(-1, &handled, SFD_CLOEXEC);
    if (signal_fd < 0) {
        r.code = errno;
        write_report(&r);
        return EXIT_RUNNER_ERROR;
    }

    pid_t child = fork();
    if (child < 0) {
        r.code = errno;
        write_report(&r);
        return EXIT_RUNNER_ERROR;
    }
    if (child == 0) start_action(a, out, err, &previous);
    close(out);
    close(err);

    long long deadline = deadline_after(a->timeout_ms);
    struct ending end = wait_for_action(child, deadline, signal_fd, hangup_fd);
    close(signal_fd);
    return finish_action(a, child, end);
}

static int cancel_action(const char *control_dir) {
    int dir = open(control_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dir < 0) return 1;
    char buf[32];
    int fd = openat(dir, "pid", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    close(dir);
    if (fd < 0) return 1; /* Not started yet, or already finished. */
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = '\0';
    pid_t pid = (pid_t)atoi(buf);
    if (pid <= 1) return 1;
    return kill(pid, SIGTERM) == 0 ? 0 : 1;
}

/* A decimal number, digits only (no sign, no space), at most `max`. */
static int parse_number(const char *text, unsigned long long max, unsigned long long *value) {
    if (!text || !*text || strspn(text, "0123456789") != strlen(text)) return -1;
    errno = 0;
    *value = strtoull(text, NULL, 10);
    return (errno || *value > max) ? -1 : 0;
}

static int parse_id(const char *text, unsigned long *value) {
    unsigned long long number;
    if (parse_number(text, 0x7fffffffULL, &number) != 0) return -1;
    *value = (unsigned long)number;
    return 0;
}

/* ------------------------------------------------------------------- the agent */

#define AGENT_SECRET_MAX 64
#define AGENT_REQUEST_MAX (1u << 20)
/* A handler waits this long for a whole request, so a silent peer cannot hold it. */
#define AGENT_REQUEST_DEADLINE_MS 5000
#define AGENT_BACKLOG 64

/* Sends all of `text`. MSG_NOSIGNAL: a worker that has gone must not end the handler. */
static int send_text(int fd, const char *text) {
    size_t len = strlen(text), sent = 0;
    while (sent < len) {
        ssize_t n = send(fd, text + sent, len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        sent += (size_t)n;
    }
    return 0;
}

/* Reads exactly `len` bytes before `deadline`; NULL if it did, else why not. */
static const char *read_exactly(int fd, char *buf, size_t len, long long deadline) {
    size_t got = 0;
    while (got < len) {
        long long left = deadline - now_ms();
        if (left <= 0) return "request timed out";
        struct pollfd pfd = {fd, POLLIN, 0};
        int ready = poll(&pfd, 1, (int)left);
        if (ready < 0 && errno != EINTR) return "cannot read the request";
        if (ready <= 0) continue;
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return "cannot read the request";
        if (n == 0) return "truncated request";
        got += (size_t)n;
    }
    return NULL;
}

/* The request's NUL-terminated fields, taken in order (the body is known to end in NUL). */
struct fields {
    char *next;
    char *end;
};

static char *next_field(struct fields *f) {
    if (f->next >= f->end) return NULL;
    char *field = f->next;
    f->next += strlen(field) + 1;
    return field;
}

/* A count of the fields that follow it: digits, and no more than the bytes left (every
 * field takes at least its NUL), which also bounds what is allocated for them. */
static int parse_count(const char *text, const struct fields *f, size_t *count) {
    unsigned long long value;
    if (parse_number(text, (unsigned long long)(f->end - f->next), &value) != 0) return -1;
    *count = (size_t)value;
    return 0;
}

/* The next `count` fields as a NULL-terminated array pointing into the body. */
static const char *take_fields(struct fields *f, size_t count, char ***list) {
    *list = calloc(count + 1, sizeof **list);
    if (!*list) return "out of memory";
    for (size_t i = 0; i < count; i++) {
        (*list)[i] = next_field(f);
        if (!(*list)[i]) return "fewer fields than counted";
    }
    return NULL;
}

/* One variable of the environment being built: its text, where its name ends, its place. */
struct env_entry {
    char *text;
    size_t name_len;
    size_t place;
};

static int same_name(const struct env_entry *x, const struct env_entry *y) {
    return x->name_len == y->name_len && memcmp(x->text, y->text, x->name_len) == 0;
}

/* By name, then by place, so that the entries of one name are together and in order. */
static int compare_env_entries(const void *left, const void *right) {
    const struct env_entry *x = left, *y = right;
    size_t shorter = x->name_len < y->name_len ? x->name_len : y->name_len;
    int order = memcmp(x->text, y->text, shorter);
    if (order == 0 && x->name_len != y->name_len) order = x->name_len < y->name_len ? -1 : 1;
    if (order == 0) order = x->place < y->place ? -1 : x->place > y->place;
    return order;
}

/*
 * The agent's environment (what Docker gave the container's main process) overlaid with
 * the request's NAME=value entries, as `docker exec -e` builds an exec's: each name keeps
 * the place of its first entry and takes the value of its last, and a new name is
 * appended. Sorting finds the repeats in n log n, however many entries a request holds.
 */
static char **overlay_environment(char **entries, size_t count) {
    size_t inherited = 0;
    while (environ[inherited]) inherited++;
    size_t total = inherited + count;
    struct env_entry *sorted = calloc(total + 1, sizeof *sorted);
    char **places = calloc(total + 1, sizeof *places);
    if (!sorted || !places) {
        free(sorted);
        free(places);
        return NULL;
    }
    for (size_t i = 0; i < total; i++) {
        char *text = i < inherited ? environ[i] : entries[i - inherited];
        sorted[i] = (struct env_entry){text, strcspn(text, "="), i};
    }
    qsort(sorted, total, sizeof *sorted, compare_env_entries);
    for (size_t first = 0, last; first < total; first = last + 1) {
        for (last = first; last + 1 < total && same_name(&sorted[last + 1], &sorted[first]);)
            last++;
        places[sorted[first].place] = sorted[last].text;
    }
    free(sorted);
    size_t kept = 0;
    for (size_t i = 0; i < total; i++) {
        if (places[i]) places[kept++] = places[i];
    }
    places[kept] = NULL;
    return places;
}

/* Parses a request body (README, `agent`, step 3) into `a`, which then points into the
 * body; NULL if it is well formed, else why not. */
static const char *parse_request(char *body, size_t len, struct action *a) {
    if (body[len - 1] != '\0') return "the last field does not end with NUL";
    struct fields f = {body, body + len};
    const char *kind = next_field(&f);
    if (strcmp(kind, "run") != 0) return "not a run request";
    a->control_dir = next_field(&f);
    const char *uid = next_field(&f);
    const char *gid = next_field(&f);
    const char *timeout = next_field(&f);
    a->workdir = next_field(&f);
    a->options = next_field(&f);
    if (!a->options) return "missing fields";

    unsigned long id;
    unsigned long long ms;
    if (parse_id(uid, &id) != 0) return "bad uid";
    a->uid = (uid_t)id;
    if (parse_id(gid, &id) != 0) return "bad gid";
    a->gid = (gid_t)id;
    if (parse_number(timeout, LLONG_MAX, &ms) != 0) return "bad timeout";
    a->timeout_ms = (long long)ms;

    size_t argc, envc;
    char **entries;
    const char *error;
    if (parse_count(next_field(&f), &f, &argc) != 0 || argc == 0) return "bad argument count";
    if ((error = take_fields(&f, argc, &a->argv)) != NULL) return error;
    if (parse_count(next_field(&f), &f, &envc) != 0) return "bad environment count";
    if ((error = take_fields(&f, envc, &entries)) != NULL) return error;
    if (f.next != f.end) return "more fields than counted";
    for (size_t i = 0; i < envc; i++) {
        size_t name_len = strcspn(entries[i], "=");
        if (name_len == 0 || entries[i][name_len] != '=') return "bad environment entry";
    }
    a->envp = overlay_environment(entries, envc);
    return a->envp ? NULL : "out of memory";
}

/* Reads one request within the deadline; NULL if it is well formed, else why not. */
static const char *read_request(int conn, struct action *a) {
    long long deadline = now_ms() + AGENT_REQUEST_DEADLINE_MS;
    unsigned char header[4];
    const char *error = read_exactly(conn, (char *)header, sizeof header, deadline);
    if (error) return error;
    uint32_t len = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 |
                   (uint32_t)header[2] << 8 | (uint32_t)header[3];
    if (len == 0 || len > AGENT_REQUEST_MAX) return "bad request length";
    char *body = malloc(len); /* Kept: the action points into it until the handler ends. */
    if (!body) return "out of memory";
    error = read_exactly(conn, body, len, deadline);
    return error ? error : parse_request(body, len, a);
}

/*
 * Whether the peer is the worker: a process outside the container's PID namespace, whose
 * pid the kernel shows here as 0. Every process of the sidecar, a root action included,
 * has a real pid. `any_pidns` (--test-same-pidns) is for the unit tests alone, which run
 * the agent on the host with no container; the worker never passes it.
 */
static int peer_is_worker(int conn, int any_pidns) {
    struct ucred peer;
    socklen_t len = sizeof peer;
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0) return 0;
    return peer.pid == 0 || any_pidns;
}

/* A handler: one connection, one action (README, `agent`, per connection). Returns its
 * exit status, which nobody reads (the kernel reaps handlers). */
static int serve_connection(int conn, const char *secret, int any_pidns) {
    /* The agent lets the kernel reap its handlers; a handler waits for its action itself. */
    signal(SIGCHLD, SIG_DFL);
    if (!peer_is_worker(conn, any_pidns)) return 1;
    char line[128];
    snprintf(line, sizeof line, "sidecar-agent 1 %s\n", secret);
    if (send_text(conn, line) != 0) return 1;
    struct action a;
    const char *error = read_request(conn, &a);
    if (error) {
        snprintf(line, sizeof line, "error %s\n", error);
        send_text(conn, line);
        return 2;
    }
    if (send_text(conn, "ack\n") != 0) return 1; /* Gone already: run nothing. */
    snprintf(line, sizeof line, "done %d\n", run_action(&a, conn));
    return send_text(conn, line) != 0;
}

/* Reads and removes the one-time secret the worker left in AGENT_DIR: 1 to 64 printable
 * characters, one trailing newline allowed. -1 if there is none or it is not valid. */
static int take_secret(const char *agent_dir, char secret[AGENT_SECRET_MAX + 1]) {
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/secret", agent_dir) >= (int)sizeof path) return -1;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[AGENT_SECRET_MAX + 2]; /* the newline, and one more byte to see a longer one */
    size_t len = 0;
    while (len < sizeof buf) {
        ssize_t n = read(fd, buf + len, sizeof buf - len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        len += (size_t)n;
    }
    close(fd);
    /* Gone before the socket exists: nothing in the sidecar, a root action included, may
     * ever read it. */
    if (unlink(path) != 0) return -1;
    if (len > 0 && buf[len - 1] == '\n') len--;
    if (len == 0 || len > AGENT_SECRET_MAX) return -1;
    for (size_t i = 0; i < len; i++) {
        if (buf[i] < 0x20 || buf[i] > 0x7e) return -1;
    }
    memcpy(secret, buf, len);
    secret[len] = '\0';
    return 0;
}

/* A listening socket at AGENT_DIR/agent.sock, root only (0600) from the start. */
static int listen_on(const char *agent_dir) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/agent.sock", agent_dir) >=
        (int)sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    unlink(addr.sun_path); /* One left by an earlier agent would make bind fail. */
    /* umask 077 leaves no moment at which others could connect; it is put back because
     * the actions inherit it. */
    mode_t umask_before = umask(077);
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    umask(umask_before);
    if (rc != 0 || chmod(addr.sun_path, 0600) != 0 || listen(fd, AGENT_BACKLOG) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* The agent (README, `agent`): set-up, then one forked handler per connection, forever. */
static int agent(const char *agent_dir, int any_pidns) {
    /* First of all: no process of the sidecar may read the secret out of our memory, nor
     * our environment. Handlers inherit this across fork. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        fprintf(stderr, "sidecar-runner: cannot make the agent non-dumpable: %s\n",
                strerror(errno));
        return 1;
    }
    char secret[AGENT_SECRET_MAX + 1];
    if (take_secret(agent_dir, secret) != 0) {
        fprintf(stderr, "sidecar-runner: no valid secret in %s/secret\n", agent_dir);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN); /* The kernel reaps ended handlers: no zombies, no waiting. */
    int listener = listen_on(agent_dir);
    if (listener < 0) {
        fprintf(stderr, "sidecar-runner: cannot listen on %s/agent.sock: %s\n", agent_dir,
                strerror(errno));
        return 1;
    }
    for (;;) {
        int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            /* Out of fds or memory passes; the agent going would take the sidecar with it.
             * A short pause keeps such a wait from spinning. */
            if (errno != EINTR && errno != ECONNABORTED) {
                struct timespec pause = {0, 10 * 1000 * 1000};
                nanosleep(&pause, NULL);
            }
            continue;
        }
        /* A failed fork closes the connection: the worker sees no greeting. */
        if (fork() == 0) {
            close(listener);
            _exit(serve_connection(conn, secret, any_pidns));
        }
        close(conn);
    }
}

static int usage(void) {
    fprintf(stderr,
            "usage: sidecar-runner keepalive\n"
            "       sidecar-runner run CONTROL_DIR UID GID TIMEOUT_MS WORKDIR OPTIONS -- ARGV...\n"
            "       sidecar-runner cancel CONTROL_DIR\n"
            "       sidecar-runner agent AGENT_DIR\n");
    return 2;
}

/*
 * `run`'s environment: its own (what Docker built for the exec from the container's settings)
 * overlaid with CONTROL_DIR/env, NUL-terminated NAME=value entries the worker wrote there.
 * The action's variables come as data in a root-only file, never as the runner's own
 * environment, so a client's variables (GLIBC_TUNABLES, MALLOC_*) never reach this root
 * process's libc. Without the file the runner's own environment is the action's.
 */
static char **run_environment(const char *control_dir) {
    int dir = open(control_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dir < 0) return environ;
    int fd = openat(dir, "env", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    close(dir);
    if (fd < 0) return environ;
    struct stat info;
    char *text = NULL;
    size_t size = 0;
    if (fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_size <= (off_t)AGENT_REQUEST_MAX) {
        size = (size_t)info.st_size;
        text = malloc(size + 1);
        if (text && read(fd, text, size) != (ssize_t)size) size = (size_t)-1;
    } else {
        size = (size_t)-1;
    }
    close(fd);
    if (!text || size == (size_t)-1 || (size > 0 && text[size - 1] != '\0')) return NULL;
    size_t count = 0;
    for (size_t i = 0; i < size; i++) count += text[i] == '\0';
    char **entries = calloc(count + 1, sizeof *entries);
    if (!entries) return NULL;
    for (size_t i = 0, at = 0; i < count; i++) {
        entries[i] = text + at;
        size_t name_len = strcspn(entries[i], "=");
        if (name_len == 0 || entries[i][name_len] != '=') return NULL;
        at += strlen(entries[i]) + 1;
    }
    return overlay_environment(entries, count);
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "keepalive") == 0) {
        for (;;) pause();
    }
    if (argc >= 3 && strcmp(argv[1], "cancel") == 0) return cancel_action(argv[2]);
    if (argc >= 10 && strcmp(argv[1], "run") == 0 && strcmp(argv[8], "--") == 0) {
        unsigned long uid, gid;
        char *end;
        long long timeout_ms = strtoll(argv[5], &end, 10);
        if (*end != '\0' || timeout_ms < 0 || parse_id(argv[3], &uid) || parse_id(argv[4], &gid))
            return usage();
        struct action a = {.control_dir = argv[2],
                           .uid = (uid_t)uid,
                           .gid = (gid_t)gid,
                           .timeout_ms = timeout_ms,
                           .workdir = argv[6],
                           .options = argv[7],
                           .argv = &argv[9],
                           .envp = run_environment(argv[2])};
        if (!a.envp) {
            fprintf(stderr, "sidecar-runner: %s/env is not a list of NAME=value entries\n",
                    argv[2]);
            return EXIT_RUNNER_ERROR;
        }
        return run_action(&a, -1);
    }
    if (argc == 3 && strcmp(argv[1], "agent") == 0) return agent(argv[2], 0);
    /* Test-only (tests/unit/test_sidecar_agent.py, no container): also serve peers of the
     * agent's own PID namespace. A flag, not an environment variable, because the
     * container's environment comes from the image; the worker never passes it. */
    if (argc == 4 && strcmp(argv[1], "agent") == 0 && strcmp(argv[3], "--test-same-pidns") == 0)
        return agent(argv[2], 1);
    return usage();
}
