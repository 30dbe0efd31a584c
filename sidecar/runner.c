/*
 * sidecar-runner: the only program of ours that runs inside a user's image.
 *
 * Static, no shell needed. Three modes (full contract in sidecar/README.md):
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
#include <linux/capability.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
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

/* Reads /proc/PID/stat: the parent PID of a live process; -1 if it is gone or a zombie. */
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

/* The real uid of a live process, from /proc/PID/status; -1 if unknown. */
static long uid_of(pid_t pid) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = '\0';
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

static int run_action(const char *control_dir, uid_t uid, gid_t gid, long long timeout_ms,
                      const char *workdir, const char *options, char **argv) {
    struct report r = {"runner_error", 0, 0, 0, 0};
    control_fd = open(control_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (control_fd < 0) {
        fprintf(stderr, "sidecar-runner: cannot open %s: %s\n", control_dir, strerror(errno));
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

    sigset_t handled, previous;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGHUP);
    sigprocmask(SIG_BLOCK, &handled, &previous);

    pid_t child = fork();
    if (child < 0) {
        r.code = errno;
        write_report(&r);
        return EXIT_RUNNER_ERROR;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &previous, NULL);
        setsid();
        int null_fd = open("/dev/null", O_RDONLY);
        if (null_fd >= 0) dup2(null_fd, 0);
        dup2(out, 1);
        dup2(err, 2);
        close(control_fd);
        if (become(uid, gid) != 0) {
            dprintf(2, "sidecar-runner: cannot become %u:%u: %s\n", (unsigned)uid, (unsigned)gid,
                    strerror(errno));
            _exit(EXIT_RUNNER_ERROR);
        }
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
    r.outcome = outcome;
    r.code = code;
    r.strays = kill_everything(child);
    if (r.strays < 0) {
        r.outcome = "unclean";
        r.strays = 0;
    }
    /* In a sidecar that runs one action at a time, no process of a non-root action's uid
     * may outlive it, whatever it did to escape the subreaper. */
    if (uid != 0 && has_option(options, "exclusive")) {
        r.survivors = kill_matching(runs_as, (long)uid, 0);
    }
    r.scrubbed = has_option(options, "scrub") ? scrub() : 0;
    write_report(&r);
    if (strcmp(r.outcome, "exited") == 0) return code;
    if (strcmp(r.outcome, "timeout") == 0) return EXIT_TIMEOUT;
    if (strcmp(r.outcome, "unclean") == 0) return EXIT_RUNNER_ERROR;
    return 128 + code;
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

static int usage(void) {
    fprintf(stderr,
            "usage: sidecar-runner keepalive\n"
            "       sidecar-runner run CONTROL_DIR UID GID TIMEOUT_MS WORKDIR OPTIONS -- ARGV...\n"
            "       sidecar-runner cancel CONTROL_DIR\n");
    return 2;
}

static int parse_id(const char *text, unsigned long *value) {
    char *end;
    if (!*text || strspn(text, "0123456789") != strlen(text)) return -1;
    errno = 0;
    *value = strtoul(text, &end, 10);
    return (errno || *value > 0x7fffffffUL) ? -1 : 0;
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
        return run_action(argv[2], (uid_t)uid, (gid_t)gid, timeout_ms, argv[6], argv[7], &argv[9]);
    }
    return usage();
}
