/*
 * fwd: the "ideal forwarder", the floor of a balancer's CPU cost on this bench.
 *
 *   fwd LISTEN_PORT BACKEND_PORT...      (listens on 127.0.0.1:LISTEN_PORT)
 *
 * Every accepted client connection gets its own new backend connection (round robin over the
 * backend ports, all on 127.0.0.1), and bytes are copied both ways as they come: one recv()
 * and one send() per message. No HTTP parsing, no connection pool, no balancing policy, no
 * timeouts, no logging on the data path. A real HTTP balancer must at least read each request
 * and write it to a backend, then read the response and write it to the client, so it cannot
 * use less CPU per request than this; whatever Shoal (or nginx, HAProxy) spends above fwd's
 * CPU per request is what its parsing, routing and pooling cost. See bench/ideal/README.md.
 *
 * Design: one thread, level-triggered epoll, non-blocking sockets everywhere (also the backend
 * connect). Each direction of a pair has a small buffer holding what could not be sent yet: if
 * a send() is partial, the rest waits there, the source stops being read (no EPOLLIN) and the
 * destination waits for EPOLLOUT; once the buffer is empty, reading resumes. When either side
 * closes or fails (EOF, ECONNRESET, any error, a failed backend connect), both are closed.
 * Pairs closed while handling one epoll batch are freed after that batch (later events of the
 * same batch may still point at them).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 16384   /* per direction; the bench's requests and responses are ~100 bytes */
#define MAX_EVENTS 256

enum { CLIENT = 0, BACKEND = 1 };

struct pair;

/* One socket of a pair. `buf` holds bytes read from the OTHER side that still have to be
 * written to this one (buf[off..len)). */
struct side {
    int fd;
    int which;               /* CLIENT or BACKEND */
    struct pair *pair;
    uint32_t events;         /* what epoll currently watches on fd */
    size_t off, len;
    char buf[BUF_SIZE];
};

struct pair {
    struct side s[2];
    int connecting;          /* backend connect() still in progress */
    int port;                /* the backend's port (for the connect-failure message) */
    int dead;                /* closed; freed after the current epoll batch */
    struct pair *next_dead;
};

static int ep;
static struct pair *dead_list;
static unsigned long connect_failures;
static char listener_tag;    /* epoll data.ptr of the listening socket */

static struct side *other(struct side *s) { return &s->pair->s[!s->which]; }

/* Watch exactly `events` on s->fd (no syscall if unchanged). */
static void watch(struct side *s, uint32_t events) {
    if (s->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
    s->events = events;
}

/* Close both sockets of a pair (closing an fd also removes it from epoll). */
static void close_pair(struct pair *p) {
    if (p->dead) return;
    for (int i = 0; i < 2; i++) close(p->s[i].fd);
    p->dead = 1;
    p->next_dead = dead_list;
    dead_list = p;
}

static void note_connect_failure(int port, int err) {
    /* a few lines are enough to see that the backends are down; no flood under load */
    if (++connect_failures <= 5)
        fprintf(stderr, "fwd: connect to 127.0.0.1:%d failed: %s (closing the client)\n", port, strerror(err));
}

/* Write the pending bytes of `dst`. Returns -1 on a fatal error, 0 otherwise. When the buffer
 * empties, stop waiting for EPOLLOUT on dst and resume reading the other side. */
static int flush(struct side *dst) {
    while (dst->off < dst->len) {
        ssize_t w = send(dst->fd, dst->buf + dst->off, dst->len - dst->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return -1;
        }
        dst->off += (size_t)w;
    }
    if (dst->off < dst->len) {
        watch(dst, dst->events | EPOLLOUT);
        watch(other(dst), other(dst)->events & ~EPOLLIN);
    } else {
        dst->off = dst->len = 0;
        watch(dst, dst->events & ~EPOLLOUT);
        watch(other(dst), other(dst)->events | EPOLLIN);
    }
    return 0;
}

/* `src` is readable: one recv() into the other side's (empty) buffer, one send() of it. */
static void forward(struct side *src) {
    struct side *dst = other(src);
    ssize_t r = recv(src->fd, dst->buf, BUF_SIZE, 0);
    if (r == 0) { close_pair(src->pair); return; }               /* orderly close */
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        close_pair(src->pair); return;                          /* ECONNRESET & co */
    }
    dst->off = 0;
    dst->len = (size_t)r;
    if (flush(dst) < 0) close_pair(src->pair);
}

/* The backend connect finished (EPOLLOUT, or an error): start copying, or give up on both. */
static void connected(struct side *b) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(b->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        note_connect_failure(b->pair->port, err);
        close_pair(b->pair);
        return;
    }
    b->pair->connecting = 0;
    watch(b, EPOLLIN);
    watch(&b->pair->s[CLIENT], EPOLLIN);
}

static int add(struct side *s, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = s};
    s->events = events;
    return epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

/* A new client: open its backend connection (non-blocking) and register both. */
static void start_pair(int cfd, int port) {
    int one = 1;
    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int bfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (bfd < 0) { perror("fwd: socket"); close(cfd); return; }
    setsockopt(bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int rc = connect(bfd, (struct sockaddr *)&a, sizeof a);
    if (rc < 0 && errno != EINPROGRESS) {
        note_connect_failure(port, errno);
        close(bfd); close(cfd); return;
    }
    struct pair *p = malloc(sizeof *p);
    if (!p) { close(bfd); close(cfd); return; }
    p->connecting = rc < 0;
    p->port = port;
    p->dead = 0;
    p->next_dead = NULL;
    for (int i = 0; i < 2; i++) {
        p->s[i].which = i;
        p->s[i].pair = p;
        p->s[i].off = p->s[i].len = 0;
    }
    p->s[CLIENT].fd = cfd;
    p->s[BACKEND].fd = bfd;
    /* While connecting, the client is registered but not read (nothing to send to yet). */
    if (add(&p->s[CLIENT], p->connecting ? 0 : EPOLLIN) < 0 ||
        add(&p->s[BACKEND], p->connecting ? EPOLLOUT : EPOLLIN) < 0) {
        perror("fwd: epoll_ctl");
        close_pair(p);
    }
}

static int listen_on(int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0) { perror("fwd: socket"); exit(1); }
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4096) < 0) {
        fprintf(stderr, "fwd: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
        exit(1);
    }
    return s;
}

static int parse_port(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 1 || v > 65535) {
        fprintf(stderr, "fwd: bad port %s\n", s);
        exit(2);
    }
    return (int)v;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: fwd LISTEN_PORT BACKEND_PORT...\n");
        return 2;
    }
    int nb = argc - 2, rr = 0;
    int *ports = malloc(sizeof(int) * (size_t)nb);
    for (int i = 0; i < nb; i++) ports[i] = parse_port(argv[2 + i]);
    int lport = parse_port(argv[1]);

    signal(SIGPIPE, SIG_IGN);    /* belt and braces: every send() has MSG_NOSIGNAL */
    struct rlimit rl;            /* two fds per client: raise the soft limit to the hard one */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }

    int ls = listen_on(lport);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("fwd: epoll_create1"); return 1; }
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    fprintf(stderr, "fwd: 127.0.0.1:%d -> %d backend(s), 1:1 connections, round robin\n", lport, nb);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("fwd: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            uint32_t e = evs[i].events;
            if (evs[i].data.ptr == &listener_tag) {
                for (;;) {   /* drain the accept queue */
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) {
                        if (errno == EINTR || errno == ECONNABORTED) continue;
                        if (errno != EAGAIN && errno != EWOULDBLOCK) perror("fwd: accept");
                        break;
                    }
                    start_pair(c, ports[rr]);
                    rr = (rr + 1) % nb;
                }
                continue;
            }
            struct side *s = evs[i].data.ptr;
            struct pair *p = s->pair;
            if (p->dead) continue;
            if (p->connecting) {   /* backend: connect done or failed; client: it gave up */
                if (s->which == BACKEND) connected(s);
                else if (e & (EPOLLERR | EPOLLHUP)) close_pair(p);
                continue;
            }
            if ((e & EPOLLOUT) && flush(s) < 0) { close_pair(p); continue; }
            if (!p->dead && (e & EPOLLIN) && (s->events & EPOLLIN)) forward(s);
            /* error or hang-up with nothing left to read: done with this pair */
            if (!p->dead && (e & (EPOLLERR | EPOLLHUP)) && !(e & EPOLLIN)) close_pair(p);
        }
        while (dead_list) {                               /* free after the batch */
            struct pair *p = dead_list;
            dead_list = p->next_dead;
            free(p);
        }
    }
}
