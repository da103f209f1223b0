/* tls_client: TLS handshake load client for bench/tls.sh (single thread, epoll, OpenSSL).
 *
 * Keeps CONNS connections in flight for SECS seconds. Every connection is a new TCP
 * connection + a TLS 1.3 handshake + one HTTP/1.1 request (`GET PATH`, `Connection: close`),
 * read until the server closes it; then the slot opens the next connection.
 *
 *   --mode new      no session is ever offered: every handshake is a full one
 *                   (ECDHE + certificate + CertificateVerify).
 *   --mode resume   each slot offers the newest session ticket it received (on its previous
 *                   connection; NewSessionTicket arrives before the response, so reading to
 *                   EOF always collects it): a PSK (psk_dhe_ke) resumption, as a browser does.
 *                   A ticket is kept and offered again until a newer one arrives, so servers
 *                   that issue single-use tickets and servers that do not re-issue on
 *                   resumption are both resumed. The first connection of every slot is full.
 *
 * The certificate chain is not verified (SSL_VERIFY_NONE: the bench cert is self-signed);
 * the TLS 1.3 CertificateVerify signature is still checked by OpenSSL as part of every full
 * handshake. SNI is sent (--sni, default "localhost"). No ALPN (HTTP/1.1).
 *
 * Prints one line:
 *   RESULT mode=.. conns=.. secs=<elapsed> done=<ok connections> rate=<ok/s> reused=<n> full=<n>
 *          err=<n> non200=<n> timeout=<n> p50_ms=.. p99_ms=.. cpu_pct=<this client's CPU, % of
 *          one core> version=.. cipher=.. group=..
 * reused/full count the ok connections by SSL_session_reused().
 *
 *   gcc -O2 -Wall -o tls_client tls_client.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_IDLE, ST_CONNECT, ST_HANDSHAKE, ST_WRITE, ST_READ };

struct conn {
  int fd;
  SSL *ssl;
  int state;
  int slot;
  int events;          /* epoll events currently registered */
  uint64_t t0;         /* ns, connection start */
  char head[16];       /* first bytes of the response */
  int head_len;
};

static SSL_CTX *ctx;
static SSL_SESSION **slot_sess;
static struct conn *conns;
static int nconns = 32, resume = 0, epfd;
static double secs = 5;
static struct sockaddr_in addr;
static const char *sni = "localhost", *path = "/";
static char req[512];
static int req_len;
static uint64_t n_ok, n_reused, n_err, n_non200, n_timeout, n_tickets, n_offered;
static double *lat_ms;
static size_t lat_cap, lat_n;
static char version[32] = "-", cipher[64] = "-", group[32] = "-";
static uint64_t conn_timeout_ns = 5000000000ull;
static int verbose_err = 3;

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int new_session_cb(SSL *ssl, SSL_SESSION *sess) {
  struct conn *c = SSL_get_app_data(ssl);
  n_tickets++;
  if (!c || !resume) return 0;
  if (slot_sess[c->slot]) SSL_SESSION_free(slot_sess[c->slot]);
  slot_sess[c->slot] = sess; /* we own the reference now */
  return 1;
}

static int accept_cert(X509_STORE_CTX *store, void *arg) {
  (void)store; (void)arg;
  return 1;
}

static void set_events(struct conn *c, int ev) {
  if (c->events == ev) return;
  struct epoll_event e = {.events = ev, .data.ptr = c};
  epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &e);
  c->events = ev;
}

static void finish(struct conn *c, int outcome) { /* outcome: 0 ok, 1 err, 2 timeout */
  if (outcome == 0) {
    if (c->head_len >= 12 && memcmp(c->head, "HTTP/1.1 200", 12) == 0) {
      n_ok++;
      if (SSL_session_reused(c->ssl)) n_reused++;
      if (lat_n < lat_cap) lat_ms[lat_n++] = (now_ns() - c->t0) / 1e6;
      if (version[0] == '-') {
        snprintf(version, sizeof version, "%s", SSL_get_version(c->ssl));
        snprintf(cipher, sizeof cipher, "%s", SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
        const char *g = SSL_group_to_name(c->ssl, SSL_get_negotiated_group(c->ssl));
        snprintf(group, sizeof group, "%s", g ? g : "?");
      }
    } else {
      n_non200++;
    }
  } else if (outcome == 1) {
    n_err++;
  } else {
    n_timeout++;
  }
  /* No close_notify: the server has closed already. Marking the connection as shut down
   * keeps OpenSSL from flagging its session (the slot's newest ticket) not resumable. After a
   * clean connection the SSL object is kept for the slot's next one (SSL_clear: cheaper than
   * SSL_free + SSL_new); after an error it is freed. */
  if (c->ssl && outcome == 0) {
    SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  } else if (c->ssl) {
    SSL_free(c->ssl);
    c->ssl = NULL;
  }
  if (c->fd >= 0) close(c->fd); /* also removes it from epoll */
  c->fd = -1;
  c->events = 0;
  c->state = ST_IDLE;
}

static void fail(struct conn *c, const char *what) {
  if (verbose_err > 0) {
    verbose_err--;
    unsigned long e = ERR_peek_error();
    fprintf(stderr, "tls_client: %s failed (errno %d: %s; ssl: %s)\n", what, errno, strerror(errno),
            e ? ERR_error_string(e, NULL) : "-");
  }
  ERR_clear_error();
  finish(c, 1);
}

static void start(struct conn *c) {
  c->t0 = now_ns();
  c->head_len = 0;
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) { fail(c, "socket"); return; }
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->state = ST_CONNECT;
  if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
    fail(c, "connect");
    return;
  }
  if (c->ssl) {
    SSL_clear(c->ssl);
  } else {
    c->ssl = SSL_new(ctx);
    SSL_set_app_data(c->ssl, c);
  }
  SSL_set_fd(c->ssl, c->fd);
  SSL_set_tlsext_host_name(c->ssl, sni);
  if (resume && slot_sess[c->slot] && SSL_SESSION_is_resumable(slot_sess[c->slot])) {
    SSL_set_session(c->ssl, slot_sess[c->slot]);
    n_offered++;
  } else {
    SSL_set_session(c->ssl, NULL); /* never offer the previous connection's session */
  }
  set_events(c, EPOLLOUT);
}

/* wait for what OpenSSL asked for; returns 1 if the caller should stop driving */
static int want(struct conn *c, int r, const char *what) {
  switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ: set_events(c, EPOLLIN); return 1;
    case SSL_ERROR_WANT_WRITE: set_events(c, EPOLLOUT); return 1;
    default: fail(c, what); return 1;
  }
}

static void drive(struct conn *c) {
  char buf[16384];
  int r;
  for (;;) {
    switch (c->state) {
      case ST_CONNECT: {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { errno = err; fail(c, "connect"); return; }
        c->state = ST_HANDSHAKE;
        break;
      }
      case ST_HANDSHAKE:
        r = SSL_connect(c->ssl);
        if (r != 1) { want(c, r, "handshake"); return; }
        c->state = ST_WRITE;
        break;
      case ST_WRITE:
        r = SSL_write(c->ssl, req, req_len);
        if (r <= 0) { want(c, r, "write"); return; }
        c->state = ST_READ;
        break;
      case ST_READ:
        r = SSL_read(c->ssl, buf, sizeof buf);
        if (r > 0) {
          if (c->head_len < (int)sizeof c->head) {
            int n = (int)sizeof c->head - c->head_len;
            if (n > r) n = r;
            memcpy(c->head + c->head_len, buf, n);
            c->head_len += n;
          }
          break;
        }
        {
          int e = SSL_get_error(c->ssl, r);
          if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)) {
            ERR_clear_error();
            finish(c, 0); /* server closed: the response is complete */
            return;
          }
          want(c, r, "read");
          return;
        }
      default:
        return;
    }
  }
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void usage(void) {
  fprintf(stderr, "usage: tls_client --port P [--host 127.0.0.1] [--mode new|resume] [--conns 32] "
                  "[--secs 5] [--sni localhost] [--path /]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1";
  int port = 0;
  static struct option opts[] = {{"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"mode", 1, 0, 'm'},
                                 {"conns", 1, 0, 'c'}, {"secs", 1, 0, 's'}, {"sni", 1, 0, 'n'},
                                 {"path", 1, 0, 'u'}, {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (o) {
      case 'h': host = optarg; break;
      case 'p': port = atoi(optarg); break;
      case 'm':
        if (!strcmp(optarg, "resume")) resume = 1;
        else if (strcmp(optarg, "new")) usage();
        break;
      case 'c': nconns = atoi(optarg); break;
      case 's': secs = atof(optarg); break;
      case 'n': sni = optarg; break;
      case 'u': path = optarg; break;
      default: usage();
    }
  }
  if (port <= 0 || nconns <= 0 || secs <= 0) usage();
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) usage();
  req_len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, sni);

  ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  /* skip X509_verify_cert altogether (OpenSSL builds the chain even with VERIFY_NONE) */
  SSL_CTX_set_cert_verify_callback(ctx, accept_cert, NULL);
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
  if (resume) {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  }
  slot_sess = calloc(nconns, sizeof *slot_sess);
  conns = calloc(nconns, sizeof *conns);
  lat_cap = 4000000;
  lat_ms = malloc(lat_cap * sizeof *lat_ms);
  epfd = epoll_create1(EPOLL_CLOEXEC);

  uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), last_done = t0, next_check = t0;
  for (int i = 0; i < nconns; i++) { conns[i].slot = i; conns[i].fd = -1; start(&conns[i]); }
  struct epoll_event evs[256];
  for (;;) {
    uint64_t now = now_ns();
    int active = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].state != ST_IDLE) active++;
    if (now >= end && active == 0) break;
    if (now >= end + conn_timeout_ns + 1000000000ull) break; /* hard stop */
    int n = epoll_wait(epfd, evs, 256, 10);
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      uint64_t before = n_ok + n_err + n_non200 + n_timeout;
      drive(c);
      if (n_ok + n_err + n_non200 + n_timeout != before) last_done = now_ns();
    }
    now = now_ns();
    if (now >= next_check) { /* per-connection timeouts */
      next_check = now + 100000000ull;
      for (int i = 0; i < nconns; i++)
        if (conns[i].state != ST_IDLE && now - conns[i].t0 > conn_timeout_ns) { finish(&conns[i], 2); last_done = now; }
    }
    if (now < end) {
      for (int i = 0; i < nconns; i++) {
        if (conns[i].state == ST_IDLE) {
          start(&conns[i]);
          if (conns[i].state == ST_IDLE) { /* failed to start (e.g. EADDRNOTAVAIL): back off */
            if (n_err > 100000 && n_ok == 0) { fprintf(stderr, "tls_client: only errors\n"); goto out; }
            usleep(1000);
          }
        }
      }
    }
  }
out:;
  double elapsed = (last_done - t0) / 1e9;
  if (elapsed <= 0) elapsed = 1e-9;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
  double p50 = 0, p99 = 0;
  if (lat_n) {
    qsort(lat_ms, lat_n, sizeof *lat_ms, cmp_d);
    p50 = lat_ms[(size_t)(0.50 * (lat_n - 1))];
    p99 = lat_ms[(size_t)(0.99 * (lat_n - 1))];
  }
  printf("RESULT mode=%s conns=%d secs=%.3f ok=%llu rate=%.1f reused=%llu full=%llu err=%llu non200=%llu "
         "timeout=%llu tickets=%llu offered=%llu p50_ms=%.3f p99_ms=%.3f cpu_pct=%.0f version=%s cipher=%s group=%s\n",
         resume ? "resume" : "new", nconns, elapsed, (unsigned long long)n_ok, n_ok / elapsed,
         (unsigned long long)n_reused, (unsigned long long)(n_ok - n_reused), (unsigned long long)n_err,
         (unsigned long long)n_non200, (unsigned long long)n_timeout, (unsigned long long)n_tickets,
         (unsigned long long)n_offered, p50, p99, 100 * cpu / elapsed,
         version, cipher, group);
  return 0;
}
