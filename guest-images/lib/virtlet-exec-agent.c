/* virtlet-exec-agent: interactive `kubectl exec` into a VM pod, over the virtio-serial port cloud.virtlet.exec.
 *
 * virtletd (the host side, runtime/virtlet/vm/exec_channel.py) holds the port's unix socket and multiplexes up
 * to MAX_SESSIONS commands over it.  Frames both ways: type (1 byte), session id (1 byte), payload length
 * (2 bytes, big-endian, at most MAX_PAYLOAD), payload.
 *   host -> guest: HELLO; OPEN (flags, rows, cols, argv NUL-separated, an empty string, env NUL-separated);
 *                  STDIN (empty payload = end of stdin); RESIZE (rows, cols); SIGNAL (signo); CLOSE (kill it)
 *   guest -> host: HELLO ("virtlet-exec 1"); STDOUT; STDERR; EXIT (4-byte exit code, 128+N for signal N);
 *                  ACK (4-byte count of stdin bytes written to the command: the host's send window)
 * A TTY session runs the command on a new pty (its own session, the pty its controlling terminal), so ^C in
 * stdin is SIGINT by the line discipline, RESIZE is TIOCSWINSZ (SIGWINCH follows).  Without a TTY, pipes.
 * When the host side disconnects (virtletd restarted), every session is killed: nobody can read its output.
 * Static, no libraries beyond libc; built at image build time by guest-images/build-agent.sh.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_SESSIONS 16
#define MAX_PAYLOAD 32768
#define MAX_ARGS 256
#define STDIN_BUF 65536 /* host window: never more unacknowledged stdin than this per session */
enum { T_HELLO = 0, T_OPEN = 1, T_STDIN = 2, T_RESIZE = 3, T_SIGNAL = 4, T_CLOSE = 5 };
enum { G_HELLO = 0x80, G_STDOUT = 0x81, G_STDERR = 0x82, G_EXIT = 0x83, G_ACK = 0x84 };

struct session {
    int used, pid, in, out, err, tty, status, exited;
    struct timespec exited_at;
    unsigned char buf[STDIN_BUF];
    size_t pending;
    int stdin_eof;
};

static struct session S[MAX_SESSIONS];
static int port = -1;

static void write_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { struct pollfd q = {fd, POLLOUT, 0}; poll(&q, 1, 1000); continue; }
            return;
        }
        p += w; n -= (size_t)w;
    }
}

static void send_frame(int type, int sid, const void *data, size_t n) {
    unsigned char h[4] = {(unsigned char)type, (unsigned char)sid, (unsigned char)(n >> 8), (unsigned char)n};
    write_all(port, h, 4);
    if (n) write_all(port, data, n);
}

static void send_u32(int type, int sid, uint32_t v) {
    unsigned char b[4] = {v >> 24, v >> 16, v >> 8, v};
    send_frame(type, sid, b, 4);
}

static void close_fd(int *fd) { if (*fd >= 0) { close(*fd); *fd = -1; } }

static void finish(int sid) {
    struct session *s = &S[sid];
    int code = WIFEXITED(s->status) ? WEXITSTATUS(s->status) : 128 + WTERMSIG(s->status);
    close_fd(&s->in); close_fd(&s->out); close_fd(&s->err);
    send_u32(G_EXIT, sid, (uint32_t)code);
    s->used = 0;
}

static void kill_session(int sid) {
    struct session *s = &S[sid];
    if (!s->used) return;
    if (!s->exited && s->pid > 0) { kill(-s->pid, SIGKILL); kill(s->pid, SIGKILL); waitpid(s->pid, NULL, 0); }
    close_fd(&s->in); close_fd(&s->out); close_fd(&s->err);
    s->used = 0;
}

static void fail_open(int sid, const char *msg, int code) {
    send_frame(G_STDERR, sid, msg, strlen(msg));
    send_u32(G_EXIT, sid, (uint32_t)code);
}

static void open_session(int sid, unsigned char *p, size_t n) {
    struct session *s = &S[sid];
    char *argv[MAX_ARGS + 1], *envp[MAX_ARGS + 4];
    int argc = 0, envc = 0, in_env = 0, fds[3][2] = {{-1, -1}, {-1, -1}, {-1, -1}}, master = -1;
    if (s->used || n < 5) { fail_open(sid, "virtlet-exec-agent: bad OPEN\n", 126); return; }
    int tty = p[0] & 1, want_stdin = p[0] & 2;
    struct winsize ws = {(unsigned short)(p[1] << 8 | p[2]), (unsigned short)(p[3] << 8 | p[4]), 0, 0};
    envp[envc++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    envp[envc++] = "HOME=/root";
    if (tty) envp[envc++] = "TERM=xterm";
    p[n - 1] = 0; /* strings are NUL-terminated; the last byte is forced to one */
    for (size_t i = 5; i < n;) {
        char *str = (char *)p + i;
        size_t len = strlen(str);
        i += len + 1;
        if (!in_env && len == 0) { in_env = 1; continue; }
        if (!in_env && argc < MAX_ARGS) argv[argc++] = str;
        else if (in_env && envc < MAX_ARGS + 3) envp[envc++] = str;
    }
    argv[argc] = NULL; envp[envc] = NULL;
    if (argc == 0) { fail_open(sid, "virtlet-exec-agent: no command\n", 126); return; }
    if (tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY);
        if (master < 0 || grantpt(master) || unlockpt(master)) { fail_open(sid, "virtlet-exec-agent: no pty\n", 126); if (master >= 0) close(master); return; }
        if (ws.ws_row && ws.ws_col) ioctl(master, TIOCSWINSZ, &ws);
    } else {
        for (int i = 0; i < 3; i++)
            if (pipe2(fds[i], O_CLOEXEC)) { fail_open(sid, "virtlet-exec-agent: no pipe\n", 126); return; }
    }
    int pid = fork();
    if (pid == 0) {
        setsid();
        sigset_t none; sigemptyset(&none); sigprocmask(SIG_SETMASK, &none, NULL);
        /* default dispositions: the agent was started in the background by rcS, where sh ignores SIGINT and
         * SIGQUIT, and ignored signals survive exec (^C would not interrupt anything) */
        for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
        if (tty) {
            int slave = open(ptsname(master), O_RDWR);
            if (slave < 0) _exit(126);
            ioctl(slave, TIOCSCTTY, 0);
            dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
            if (slave > 2) close(slave);
        } else {
            if (want_stdin) dup2(fds[0][0], 0); else { int nul = open("/dev/null", O_RDONLY); dup2(nul, 0); }
            dup2(fds[1][1], 1); dup2(fds[2][1], 2);
        }
        if (port > 2) close(port);
        if (chdir("/root")) { if (chdir("/")) {} }
        execvpe(argv[0], argv, envp);
        int e = errno;
        dprintf(2, "virtlet-exec-agent: %s: %s\n", argv[0], strerror(e));
        _exit(e == ENOENT ? 127 : 126);
    }
    memset(s, 0, sizeof *s);
    s->used = 1; s->pid = pid; s->tty = tty;
    if (tty) { s->in = master; s->out = dup(master); s->err = -1; }
    else {
        close(fds[0][0]); close(fds[1][1]); close(fds[2][1]);
        s->in = want_stdin ? fds[0][1] : (close(fds[0][1]), -1);
        s->out = fds[1][0]; s->err = fds[2][0];
    }
    if (s->in >= 0) fcntl(s->in, F_SETFL, fcntl(s->in, F_GETFL) | O_NONBLOCK);
    if (pid < 0) { s->status = 126 << 8; s->exited = 1; clock_gettime(CLOCK_MONOTONIC, &s->exited_at); }
}

static void flush_stdin(int sid) {
    struct session *s = &S[sid];
    if (s->in < 0) { s->pending = 0; return; }
    size_t done = 0;
    while (done < s->pending) {
        ssize_t w = write(s->in, s->buf + done, s->pending - done);
        if (w < 0) { if (errno == EINTR) continue; if (errno == EAGAIN) break; done = s->pending; break; }
        done += (size_t)w;
    }
    if (done) {
        memmove(s->buf, s->buf + done, s->pending - done);
        s->pending -= done;
        send_u32(G_ACK, sid, (uint32_t)done);
    }
    if (!s->pending && s->stdin_eof && !s->tty) close_fd(&s->in);
}

static int read_full(unsigned char *p, size_t n) {
    while (n) {
        ssize_t r = read(port, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}

static void handle_frame(void) {
    static unsigned char p[MAX_PAYLOAD + 1];
    unsigned char h[4];
    if (read_full(h, 4)) return;
    size_t n = (size_t)h[2] << 8 | h[3];
    int sid = h[1] % MAX_SESSIONS;
    if (n > MAX_PAYLOAD || read_full(p, n)) return;
    struct session *s = &S[sid];
    switch (h[0]) {
    case T_HELLO: send_frame(G_HELLO, 0, "virtlet-exec 1", 14); break;
    case T_OPEN: p[n] = 0; open_session(sid, p, n + 1); break;
    case T_STDIN:
        if (!s->used) break;
        if (n == 0) { s->stdin_eof = 1; if (s->tty && s->in >= 0) write_all(s->in, (const unsigned char *)"\x04", 1); }
        else if (s->pending + n <= STDIN_BUF) { memcpy(s->buf + s->pending, p, n); s->pending += n; }
        flush_stdin(sid);
        break;
    case T_RESIZE:
        if (s->used && s->tty && n >= 4 && s->in >= 0) {
            struct winsize ws = {(unsigned short)(p[0] << 8 | p[1]), (unsigned short)(p[2] << 8 | p[3]), 0, 0};
            ioctl(s->in, TIOCSWINSZ, &ws);
        }
        break;
    case T_SIGNAL: if (s->used && !s->exited && n >= 1 && p[0] < 65) kill(-s->pid, p[0]); break;
    case T_CLOSE: /* answered with an EXIT, after which the host may reuse the id */
        if (s->used) { kill_session(sid); send_u32(G_EXIT, sid, 128 + SIGKILL); }
        break;
    }
}

static int open_port(const char *path) {
    int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) { perror(path); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: virtlet-exec-agent /dev/vportNpM\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    port = open_port(argv[1]);
    int connected = 0;
    for (;;) {
        struct pollfd pf[1 + 2 * MAX_SESSIONS + MAX_SESSIONS];
        int who[1 + 3 * MAX_SESSIONS], n = 0;
        pf[n].fd = port; pf[n].events = POLLIN; who[n++] = -1;
        for (int i = 0; i < MAX_SESSIONS; i++) {
            if (!S[i].used) continue;
            if (S[i].out >= 0) { pf[n].fd = S[i].out; pf[n].events = POLLIN; who[n++] = i * 4 + 1; }
            if (S[i].err >= 0) { pf[n].fd = S[i].err; pf[n].events = POLLIN; who[n++] = i * 4 + 2; }
            if (S[i].pending && S[i].in >= 0) { pf[n].fd = S[i].in; pf[n].events = POLLOUT; who[n++] = i * 4 + 3; }
        }
        int r = poll(pf, (nfds_t)n, 200);
        if (r < 0 && errno != EINTR) return 1;
        if (pf[0].revents & POLLHUP && !(pf[0].revents & POLLIN)) {
            /* the host side is not connected: sessions lose their reader; wait for it to come back */
            if (connected) for (int i = 0; i < MAX_SESSIONS; i++) kill_session(i);
            connected = 0;
            usleep(200000);
            continue;
        }
        if (!connected) { connected = 1; send_frame(G_HELLO, 0, "virtlet-exec 1", 14); }
        if (pf[0].revents & POLLIN) handle_frame();
        for (int k = 1; k < n; k++) {
            int sid = who[k] / 4, kind = who[k] % 4;
            if (!S[sid].used || !pf[k].revents) continue;
            if (kind == 3) { flush_stdin(sid); continue; }
            int *fd = kind == 1 ? &S[sid].out : &S[sid].err;
            if (*fd < 0) continue;
            static unsigned char buf[16384];
            ssize_t got = read(*fd, buf, sizeof buf);
            if (got > 0) send_frame(kind == 1 ? G_STDOUT : G_STDERR, sid, buf, (size_t)got);
            else if (got == 0 || (errno != EINTR && errno != EAGAIN)) close_fd(fd);
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &S[i];
            if (!s->used) continue;
            if (!s->exited && waitpid(s->pid, &s->status, WNOHANG) == s->pid) { s->exited = 1; s->exited_at = now; }
            /* exited: report once its output is drained, or 2 s later (a background child may hold the pty) */
            if (s->exited && ((s->out < 0 && s->err < 0) || now.tv_sec - s->exited_at.tv_sec >= 2)) finish(i);
        }
    }
}
