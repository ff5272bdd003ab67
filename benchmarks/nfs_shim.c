/* LD_PRELOAD shim for the laufband benchmarks: simulate NFS round trips.
 *
 * Wraps the libc calls that are server round trips on NFS -- open/close (close-to-open
 * consistency), link/unlink/rename (the lock-file protocol and SQLite's journal),
 * fsync/fdatasync (COMMIT), ftruncate/truncate (SETATTR: SQLite's journal_mode=truncate)
 * and fcntl byte-range locks (lockd) -- for files under one
 * directory, and sleeps a configurable time before each. It also counts every call and
 * the real time spent in it (without the injected delay), separately for lock files
 * (names containing ".lock": flufl.lock's lock and claim files) and everything else
 * (the database, its journal and the directory), so the benchmark can verify that the
 * shim fired and decompose where a transaction's time goes.
 *
 * Environment:
 *   NFSSIM_PREFIX     only paths under this directory (absolute) are affected
 *   NFSSIM_DELAY_US   microseconds to sleep before each delayed operation (default 0)
 *   NFSSIM_OPS        comma list of categories to delay (default
 *                     "open,close,link,unlink,rename,fsync,truncate,lock"; also "stat",
 *                     "utime", "access")
 *   NFSSIM_STATS      directory: at exit each process writes <pid>.txt with lines
 *                     "<kind> <category> <calls> <real_ns> <delay_ns>", kind db|lock
 *
 * benchmarks/run.py builds it with: gcc -O2 -shared -fPIC -o nfs_shim.so nfs_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { C_OPEN, C_CLOSE, C_LINK, C_UNLINK, C_RENAME, C_FSYNC, C_LOCK, C_STAT, C_UTIME,
       C_ACCESS, C_TRUNC, C_N };
static const char *NAMES[C_N] = {"open", "close", "link", "unlink", "rename", "fsync",
                                 "lock", "stat", "utime", "access", "truncate"};
/* kind 1: database files and anything else under the prefix; kind 2: lock files */
enum { K_NONE, K_DB, K_LOCK, K_N };
static const char *KINDS[K_N] = {"none", "db", "lock"};

static char prefix[4096];
static size_t prefix_len;
static long delay_ns;
static int delayed[C_N];
static atomic_long calls[K_N][C_N], real_ns[K_N][C_N], slept_ns[K_N][C_N];
#define MAX_FD 65536
static atomic_char tracked[MAX_FD]; /* kind of each open fd, K_NONE if not ours */
static int ready;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

__attribute__((constructor)) static void init(void) {
    const char *p = getenv("NFSSIM_PREFIX");
    if (p && *p) {
        strncpy(prefix, p, sizeof prefix - 2);
        prefix_len = strlen(prefix);
        while (prefix_len > 1 && prefix[prefix_len - 1] == '/') prefix[--prefix_len] = 0;
    }
    const char *d = getenv("NFSSIM_DELAY_US");
    delay_ns = d ? atol(d) * 1000L : 0;
    const char *ops = getenv("NFSSIM_OPS");
    if (!ops) ops = "open,close,link,unlink,rename,fsync,truncate,lock";
    for (int c = 0; c < C_N; c++) {
        const char *hit = strstr(ops, NAMES[c]);
        size_t n = strlen(NAMES[c]);
        delayed[c] = hit && (hit == ops || hit[-1] == ',') && (hit[n] == 0 || hit[n] == ',');
    }
    ready = 1;
}

__attribute__((destructor)) static void report(void) {
    const char *dir = getenv("NFSSIM_STATS");
    if (!dir || !*dir) return;
    char path[4200];
    snprintf(path, sizeof path, "%s/%d.txt", dir, (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f) return;
    for (int k = K_DB; k < K_N; k++)
        for (int c = 0; c < C_N; c++)
            fprintf(f, "%s %s %ld %ld %ld\n", KINDS[k], NAMES[c],
                    atomic_load(&calls[k][c]), atomic_load(&real_ns[k][c]),
                    atomic_load(&slept_ns[k][c]));
    fclose(f);
}

/* The kind of a path (relative to dirfd or the cwd): K_NONE if not under the prefix. */
static int kind_of(int dirfd, const char *path) {
    if (!ready || !prefix_len || !path) return K_NONE;
    char buf[8192];
    if (path[0] != '/') {
        if (dirfd != AT_FDCWD) {
            if (dirfd < 0 || dirfd >= MAX_FD || !tracked[dirfd]) return K_NONE;
        } else {
            if (!getcwd(buf, 4096)) return K_NONE;
            size_t n = strlen(buf);
            snprintf(buf + n, sizeof buf - n, "/%s", path);
            path = buf;
            if (strncmp(path, prefix, prefix_len) != 0 ||
                (path[prefix_len] != '/' && path[prefix_len] != 0))
                return K_NONE;
        }
    } else if (strncmp(path, prefix, prefix_len) != 0 ||
               (path[prefix_len] != '/' && path[prefix_len] != 0)) {
        return K_NONE;
    }
    const char *base = strrchr(path, '/');
    return strstr(base ? base : path, ".lock") ? K_LOCK : K_DB;
}

static int fd_kind(int fd) { return fd >= 0 && fd < MAX_FD ? tracked[fd] : K_NONE; }

static long before(int k, int c) {
    atomic_fetch_add(&calls[k][c], 1);
    if (delayed[c] && delay_ns > 0) {
        struct timespec ts = {delay_ns / 1000000000L, delay_ns % 1000000000L};
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
        atomic_fetch_add(&slept_ns[k][c], delay_ns);
    }
    return now_ns();
}

static void after(int k, int c, long t0) { atomic_fetch_add(&real_ns[k][c], now_ns() - t0); }

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

/* Run expr; if it acts on our files (kind k), delay before it and time it. */
#define TIMED(k, cat, expr) do {                                          \
        int k_ = (k);                                                     \
        if (k_ == K_NONE) return (expr);                                  \
        long t0 = before(k_, cat); __typeof__(expr) r = (expr);           \
        int saved = errno; after(k_, cat, t0); errno = saved; return r;   \
    } while (0)

#define OPENCALL(dirfd, path, expr) do {                                  \
        int k = kind_of(dirfd, path);                                     \
        if (k == K_NONE) return (expr);                                   \
        long t0 = before(k, C_OPEN); int fd = (expr); int saved = errno;  \
        after(k, C_OPEN, t0);                                             \
        if (fd >= 0 && fd < MAX_FD) tracked[fd] = (char)k;                \
        errno = saved; return fd;                                         \
    } while (0)

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    REAL(open);
    OPENCALL(AT_FDCWD, path, real_open(path, flags, m));
}
int open64(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    REAL(open64);
    OPENCALL(AT_FDCWD, path, real_open64(path, flags, m));
}
int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    REAL(openat);
    OPENCALL(dirfd, path, real_openat(dirfd, path, flags, m));
}
int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    REAL(openat64);
    OPENCALL(dirfd, path, real_openat64(dirfd, path, flags, m));
}
int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open64(path, flags); }
int __openat_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char *path, int flags) {
    return openat64(dirfd, path, flags);
}
int creat(const char *path, mode_t m) { return open(path, O_CREAT | O_WRONLY | O_TRUNC, m); }
int creat64(const char *path, mode_t m) {
    return open64(path, O_CREAT | O_WRONLY | O_TRUNC, m);
}

int close(int fd) {
    REAL(close);
    int k = fd_kind(fd);
    if (k != K_NONE) tracked[fd] = K_NONE;
    TIMED(k, C_CLOSE, real_close(fd));
}
int fsync(int fd) { REAL(fsync); TIMED(fd_kind(fd), C_FSYNC, real_fsync(fd)); }
int fdatasync(int fd) { REAL(fdatasync); TIMED(fd_kind(fd), C_FSYNC, real_fdatasync(fd)); }
int ftruncate(int fd, off_t n) {
    REAL(ftruncate); TIMED(fd_kind(fd), C_TRUNC, real_ftruncate(fd, n));
}
int ftruncate64(int fd, off64_t n) {
    REAL(ftruncate64); TIMED(fd_kind(fd), C_TRUNC, real_ftruncate64(fd, n));
}
int truncate(const char *p, off_t n) {
    REAL(truncate); TIMED(kind_of(AT_FDCWD, p), C_TRUNC, real_truncate(p, n));
}
int truncate64(const char *p, off64_t n) {
    REAL(truncate64); TIMED(kind_of(AT_FDCWD, p), C_TRUNC, real_truncate64(p, n));
}

static int is_lock_cmd(int cmd) {
    return cmd == F_SETLK || cmd == F_SETLKW || cmd == F_GETLK || cmd == F_OFD_SETLK ||
           cmd == F_OFD_SETLKW || cmd == F_OFD_GETLK;
}
int fcntl(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    REAL(fcntl);
    TIMED(is_lock_cmd(cmd) ? fd_kind(fd) : K_NONE, C_LOCK, real_fcntl(fd, cmd, arg));
}
int fcntl64(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    REAL(fcntl64);
    TIMED(is_lock_cmd(cmd) ? fd_kind(fd) : K_NONE, C_LOCK, real_fcntl64(fd, cmd, arg));
}

int link(const char *a, const char *b) {
    REAL(link); TIMED(kind_of(AT_FDCWD, b), C_LINK, real_link(a, b));
}
int linkat(int da, const char *a, int db, const char *b, int flags) {
    REAL(linkat); TIMED(kind_of(db, b), C_LINK, real_linkat(da, a, db, b, flags));
}
int unlink(const char *p) { REAL(unlink); TIMED(kind_of(AT_FDCWD, p), C_UNLINK, real_unlink(p)); }
int unlinkat(int d, const char *p, int flags) {
    REAL(unlinkat); TIMED(kind_of(d, p), C_UNLINK, real_unlinkat(d, p, flags));
}
int rename(const char *a, const char *b) {
    REAL(rename); TIMED(kind_of(AT_FDCWD, b), C_RENAME, real_rename(a, b));
}
int renameat(int da, const char *a, int db, const char *b) {
    REAL(renameat); TIMED(kind_of(db, b), C_RENAME, real_renameat(da, a, db, b));
}
int stat(const char *p, struct stat *s) {
    REAL(stat); TIMED(kind_of(AT_FDCWD, p), C_STAT, real_stat(p, s));
}
int stat64(const char *p, struct stat64 *s) {
    REAL(stat64); TIMED(kind_of(AT_FDCWD, p), C_STAT, real_stat64(p, s));
}
int lstat(const char *p, struct stat *s) {
    REAL(lstat); TIMED(kind_of(AT_FDCWD, p), C_STAT, real_lstat(p, s));
}
int lstat64(const char *p, struct stat64 *s) {
    REAL(lstat64); TIMED(kind_of(AT_FDCWD, p), C_STAT, real_lstat64(p, s));
}
int fstatat64(int d, const char *p, struct stat64 *s, int flags) {
    REAL(fstatat64); TIMED(kind_of(d, p), C_STAT, real_fstatat64(d, p, s, flags));
}
int utimensat(int d, const char *p, const struct timespec t[2], int flags) {
    REAL(utimensat); TIMED(kind_of(d, p), C_UTIME, real_utimensat(d, p, t, flags));
}
int access(const char *p, int mode) {
    REAL(access); TIMED(kind_of(AT_FDCWD, p), C_ACCESS, real_access(p, mode));
}

/* For the benchmark worker (via ctypes): copy the counters into out, which holds
 * K_N * C_N * 3 longs (calls, real_ns, slept_ns for each kind and category), and return
 * the number of longs written. Lets a worker count only its claiming phase. */
int nfssim_counters(long *out, int size) {
    int i = 0;
    for (int k = 0; k < K_N; k++)
        for (int c = 0; c < C_N; c++) {
            if (i + 3 > size) return i;
            out[i++] = atomic_load(&calls[k][c]);
            out[i++] = atomic_load(&real_ns[k][c]);
            out[i++] = atomic_load(&slept_ns[k][c]);
        }
    return i;
}

/* The names matching nfssim_counters' layout: "kind category" pairs, comma-separated. */
const char *nfssim_layout(void) {
    static char buf[1024];
    if (!buf[0]) {
        size_t n = 0;
        for (int k = 0; k < K_N; k++)
            for (int c = 0; c < C_N; c++)
                n += snprintf(buf + n, sizeof buf - n, "%s%s %s", n ? "," : "", KINDS[k],
                              NAMES[c]);
    }
    return buf;
}
