// SPDX-License-Identifier: GPL-2.0
/*
 * vmsocket-test - guest-side tests and benchmarks for /dev/vmsocketN.
 *
 * A static program for a busybox initramfs. The host-side boot test parses
 * its output, so the lines it prints are an interface:
 *
 *   vmsocket-test selftest DEV     (an echo server at DEV's host end)
 *     VMSOCKET-TEST <short|large|many-small|reconnect> PASS|FAIL key=value...
 *     VMSOCKET-TEST-DONE pass=<n> fail=<m>
 *   vmsocket-test refused DEV      (nothing listens at DEV's host end)
 *     VMSOCKET-TEST connect-refused PASS|FAIL errno=<name>
 *   vmsocket-test signal DEV       (an echo server at DEV's host end)
 *     VMSOCKET-TEST signal-interrupts-read PASS|FAIL key=value...
 *   vmsocket-test bench REPS CHANNEL ECHO SINK SOURCE [CHANNEL ECHO SINK SOURCE]...
 *     (a DEV "unix:PATH" is a host UNIX socket: the benchmark's ceiling;
 *      "fd:N" an inherited open file descriptor)
 *     VMSOCKET-BENCH <channel> <g2h|h2g> size=<n> bytes=<total> seconds=<s> mbps=<MB/s> rep=<i>
 *     VMSOCKET-BENCH <channel> rtt64 count=<n> usec=<mean> rep=<i>
 *   vmsocket-test driver ECHO SILENT HANGUP STALL FOREIGN ECHO2
 *                        LIE_CONN600 LIE_CONN512 LIE_CONNPOS LIE_WRITE0
 *                        LIE_READ513 [TEST...]
 *     (the driver's review and stream-mode tests; see
 *     docs/vmsocket-driver.md. With the driver's parameter stream=0 the
 *     test names end in "@v1". VMSOCKET-HOST-DROP <i> asks the host to
 *     drop device <i>'s connection.)
 *     VMSOCKET-TEST <name> PASS|FAIL key=value...
 *     VMSOCKET-TEST-DONE pass=<n> fail=<m>
 *
 * Exit status: 0 when everything passed, 1 when a test failed, 2 on usage
 * errors.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#define LARGE_BYTES		(3u << 20)
#define SMALL_COUNT		1000
#define SMALL_MAX		200
#define BENCH_BYTES		(32u << 20)
#define BENCH_MIN_SECONDS	0.5
#define BENCH_MAX_ROUNDS	16
#define RTT_COUNT		2000
#define RTT_SIZE		64

#define ARRAY_SIZE(a)		(sizeof(a) / sizeof((a)[0]))

static const char hello[] = "hello vmsocket\n";

/* ---- helpers ---------------------------------------------------------- */

static const char *errname(int e)
{
	static char buf[16];

	switch (e) {
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EINTR: return "EINTR";
	case EIO: return "EIO";
	case ENXIO: return "ENXIO";
	case EBADF: return "EBADF";
	case EAGAIN: return "EAGAIN";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	case EFAULT: return "EFAULT";
	case EBUSY: return "EBUSY";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case EPIPE: return "EPIPE";
	case EMSGSIZE: return "EMSGSIZE";
	case ECONNRESET: return "ECONNRESET";
	case EISCONN: return "EISCONN";
	case ENOTCONN: return "ENOTCONN";
	case ETIMEDOUT: return "ETIMEDOUT";
	case ECONNREFUSED: return "ECONNREFUSED";
	case EINPROGRESS: return "EINPROGRESS";
	}
	snprintf(buf, sizeof(buf), "E%d", e);
	return buf;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

#define FNV_OFFSET	0xcbf29ce484222325ULL
#define FNV_PRIME	0x100000001b3ULL

static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n)
{
	while (n--) {
		h ^= *p++;
		h *= FNV_PRIME;
	}
	return h;
}

/* xorshift64*: deterministic pseudo-random bytes */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dULL;
}

static void fill_random(unsigned char *p, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		p[i] = rng() >> 56;
}

static void put_le64(unsigned char *p, uint64_t v)
{
	int i;

	for (i = 0; i < 8; i++)
		p[i] = v >> (8 * i);
}

static uint64_t get_le64(const unsigned char *p)
{
	uint64_t v = 0;
	int i;

	for (i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

/* Write all n bytes (retrying short writes). 0 or -errno. */
static int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	ssize_t r;

	while (n) {
		r = write(fd, p, n);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EIO;
		p += r;
		n -= r;
	}
	return 0;
}

/*
 * Read exactly n bytes in reads of at most chunk bytes. Returns 0,
 * -errno, or -EPIPE on a premature end of file.
 */
static int read_exact(int fd, void *buf, size_t n, size_t chunk)
{
	char *p = buf;
	ssize_t r;

	while (n) {
		r = read(fd, p, n < chunk ? n : chunk);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EPIPE;
		p += r;
		n -= r;
	}
	return 0;
}

/* One echo round trip of len bytes. 0, -errno, or 1 on a mismatch. */
static int echo_once(int fd, const void *msg, size_t len, void *scratch)
{
	int r;

	r = write_all(fd, msg, len);
	if (r)
		return r;
	r = read_exact(fd, scratch, len, len);
	if (r)
		return r;
	return memcmp(msg, scratch, len) ? 1 : 0;
}

static const char *echo_err(int r)
{
	return r == 1 ? "mismatch" : errname(-r);
}

static int npass, nfail;
static const char *name_suffix = "";	/* "@v1": the driver runs stream=0 */

static void result(const char *name, int ok, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void result(const char *name, int ok, const char *fmt, ...)
{
	va_list ap;

	printf("VMSOCKET-TEST %s%s %s", name, name_suffix, ok ? "PASS" : "FAIL");
	if (fmt && *fmt) {
		putchar(' ');
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
	}
	putchar('\n');
	fflush(stdout);
	if (ok)
		npass++;
	else
		nfail++;
}

/* ---- selftest --------------------------------------------------------- */

static int test_short(int fd)
{
	char back[sizeof(hello)];
	int r = echo_once(fd, hello, sizeof(hello) - 1, back);

	if (r)
		result("short", 0, "bytes=%zu err=%s", sizeof(hello) - 1,
		       echo_err(r));
	else
		result("short", 1, "bytes=%zu", sizeof(hello) - 1);
	return r == 0;
}

static void test_large(int fd)
{
	unsigned char *out = malloc(LARGE_BYTES), *in = malloc(LARGE_BYTES);
	uint64_t h;
	ssize_t w;
	double t0;
	int r;

	if (!out || !in) {
		result("large", 0, "bytes=%u err=ENOMEM", LARGE_BYTES);
		goto out;
	}
	fill_random(out, LARGE_BYTES);
	h = fnv1a(FNV_OFFSET, out, LARGE_BYTES);
	t0 = now();
	w = write(fd, out, LARGE_BYTES);	/* one call, larger than the buffer */
	if (w != (ssize_t)LARGE_BYTES) {
		result("large", 0, "bytes=%u fnv=%016" PRIx64 " write=%zd err=%s",
		       LARGE_BYTES, h, w, w < 0 ? errname(errno) : "short");
		goto out;
	}
	r = read_exact(fd, in, LARGE_BYTES, 1u << 20);
	if (r) {
		result("large", 0, "bytes=%u fnv=%016" PRIx64 " err=%s",
		       LARGE_BYTES, h, errname(-r));
		goto out;
	}
	if (memcmp(out, in, LARGE_BYTES)) {
		result("large", 0, "bytes=%u fnv=%016" PRIx64 " back=%016" PRIx64
		       " err=mismatch", LARGE_BYTES, h,
		       fnv1a(FNV_OFFSET, in, LARGE_BYTES));
		goto out;
	}
	result("large", 1, "bytes=%u fnv=%016" PRIx64 " seconds=%.3f",
	       LARGE_BYTES, h, now() - t0);
out:
	free(out);
	free(in);
}

static void test_many_small(int fd)
{
	unsigned char msg[SMALL_MAX], back[SMALL_MAX];
	size_t total = 0, len;
	int i, r;

	for (i = 0; i < SMALL_COUNT; i++) {
		len = 1 + rng() % SMALL_MAX;
		fill_random(msg, len);
		r = echo_once(fd, msg, len, back);
		if (r) {
			result("many-small", 0, "count=%d bytes=%zu err=%s",
			       i, total, echo_err(r));
			return;
		}
		total += len;
	}
	result("many-small", 1, "count=%d bytes=%zu", SMALL_COUNT, total);
}

static int cmd_selftest(const char *dev)
{
	char back[sizeof(hello)];
	int fd, r;

	fd = open(dev, O_RDWR);
	if (fd < 0) {
		const char *e = errname(errno);

		result("short", 0, "err=open:%s", e);
		result("large", 0, "err=open:%s", e);
		result("many-small", 0, "err=open:%s", e);
		result("reconnect", 0, "err=open:%s", e);
		goto done;
	}
	test_short(fd);
	test_large(fd);
	test_many_small(fd);

	close(fd);
	fd = open(dev, O_RDWR);
	if (fd < 0) {
		result("reconnect", 0, "err=open:%s", errname(errno));
		goto done;
	}
	r = echo_once(fd, hello, sizeof(hello) - 1, back);
	if (r)
		result("reconnect", 0, "err=%s", echo_err(r));
	else
		result("reconnect", 1, "bytes=%zu", sizeof(hello) - 1);
	close(fd);
done:
	printf("VMSOCKET-TEST-DONE pass=%d fail=%d\n", npass, nfail);
	fflush(stdout);
	return nfail ? 1 : 0;
}

/* ---- refused ---------------------------------------------------------- */

static int cmd_refused(const char *dev)
{
	int fd = open(dev, O_RDWR);
	int e = errno;

	if (fd >= 0) {
		result("connect-refused", 0, "errno=none err=opened");
		close(fd);
		return 1;
	}
	result("connect-refused", e == ECONNREFUSED || e == ENOENT,
	       "errno=%s", errname(e));
	return nfail ? 1 : 0;
}

/* ---- signal ----------------------------------------------------------- */

static void on_alarm(int sig)
{
	(void)sig;
}

static int cmd_signal(const char *dev)
{
	struct sigaction sa;
	char buf[256], back[sizeof(hello)];
	double t0, dt;
	ssize_t r;
	int fd, e, ok, after;

	fd = open(dev, O_RDWR);
	if (fd < 0) {
		result("signal-interrupts-read", 0, "err=open:%s",
		       errname(errno));
		return 1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGALRM, &sa, NULL);

	t0 = now();
	alarm(1);
	r = read(fd, buf, sizeof(buf));
	e = errno;
	dt = now() - t0;
	alarm(0);
	ok = r == -1 && e == EINTR;

	/* The connection must still work after the cancelled READ. */
	after = echo_once(fd, hello, sizeof(hello) - 1, back);
	close(fd);

	result("signal-interrupts-read", ok && !after,
	       "ret=%zd errno=%s seconds=%.3f after=%s", r,
	       r < 0 ? errname(e) : "none", dt,
	       after ? echo_err(after) : "ok");
	return nfail ? 1 : 0;
}

/* ---- bench ------------------------------------------------------------ */

/*
 * vmsocket-test bench REPS CHANNEL ECHO SINK SOURCE [CHANNEL ECHO SINK SOURCE]...
 *
 * Every cell (g2h and h2g with 4 KiB, 64 KiB and 1 MiB writes or reads,
 * rtt64) is measured REPS times on every channel. The channels take turns
 * cell by cell, in an order that rotates with each repetition, so that
 * drift (the host's load, other guests) hits every channel alike. Each
 * channel's three devices are opened once for the whole run, as a
 * performance-minded user would. A device "unix:PATH" is a UNIX socket:
 * the host runs this same program against its servers for the ceiling.
 * A device "fd:N" is one the caller opened (/init opens vmsocket-v1's with
 * the driver's stream parameter off).
 */

#define BENCH_MAX_CHANNELS	4
#define BENCH_MAX_REPS		100
#define BENCH_CELLS		7	/* g2h x 3 sizes, h2g x 3 sizes, rtt64 */

static const size_t bench_sizes[] = { 4096, 65536, 1048576 };

struct bench_channel {
	const char *name;
	int efd, kfd, sfd;
	int failed;
};

static const char *channel;
static int bench_rep;

static int open_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, e;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		e = errno;
		close(fd);
		errno = e;
		fd = -1;
	}
	return fd;
}

static int open_dev(const char *dev)
{
	int fd;

	if (!strncmp(dev, "unix:", 5))
		fd = open_unix(dev + 5);
	else if (!strncmp(dev, "fd:", 3))
		fd = dup(atoi(dev + 3));
	else
		fd = open(dev, O_RDWR);
	if (fd < 0)
		printf("VMSOCKET-BENCH %s open FAIL dev=%s err=%s\n", channel,
		       dev, errname(errno));
	return fd;
}

static void bench_line(const char *dir, size_t size, uint64_t bytes, double s)
{
	printf("VMSOCKET-BENCH %s %s size=%zu bytes=%" PRIu64
	       " seconds=%.3f mbps=%.1f rep=%d\n", channel, dir, size, bytes, s,
	       s > 0 ? bytes / s / 1e6 : 0.0, bench_rep);
	fflush(stdout);
}

static int bench_fail(const char *dir, size_t size, const char *err)
{
	printf("VMSOCKET-BENCH %s %s size=%zu FAIL err=%s rep=%d\n", channel,
	       dir, size, err, bench_rep);
	fflush(stdout);
	nfail++;
	return -1;
}

/*
 * guest -> host: 8-byte length, data in writes of size bytes; the server
 * replies count + FNV-1a. It sends fnv 0 when it did not hash (the boot
 * test's sink never does: no per-byte work on the hot path), and only a
 * non-zero fnv is checked, after the clock stopped.
 */
static int bench_g2h(int fd, size_t size, const unsigned char *data)
{
	uint64_t per = BENCH_BYTES - BENCH_BYTES % size, total = 0, h, fnv;
	unsigned char hdr[8], reply[16];
	uint64_t done;
	double t0, dt = 0;
	int rounds, r;

	for (rounds = 0; rounds < BENCH_MAX_ROUNDS && dt < BENCH_MIN_SECONDS;
	     rounds++) {
		t0 = now();
		put_le64(hdr, per);
		r = write_all(fd, hdr, 8);
		for (done = 0; !r && done < per; done += size)
			r = write_all(fd, data, size);
		if (!r)
			r = read_exact(fd, reply, 16, 16);
		if (r)
			return bench_fail("g2h", size, errname(-r));
		dt += now() - t0;
		if (get_le64(reply) != per)
			return bench_fail("g2h", size, "count-mismatch");
		fnv = get_le64(reply + 8);
		if (fnv) {
			for (h = FNV_OFFSET, done = 0; done < per; done += size)
				h = fnv1a(h, data, size);
			if (fnv != h)
				return bench_fail("g2h", size, "fnv-mismatch");
		}
		total += per;
	}
	bench_line("g2h", size, total, dt);
	return 0;
}

/* host -> guest: 8-byte length, then the server sends that many bytes. */
static int bench_h2g(int fd, size_t size, unsigned char *buf)
{
	uint64_t per = BENCH_BYTES, total = 0, left;
	unsigned char hdr[8];
	double t0, dt = 0;
	int rounds, r;
	ssize_t n;

	for (rounds = 0; rounds < BENCH_MAX_ROUNDS && dt < BENCH_MIN_SECONDS;
	     rounds++) {
		t0 = now();
		put_le64(hdr, per);
		r = write_all(fd, hdr, 8);
		if (r)
			return bench_fail("h2g", size, errname(-r));
		for (left = per; left; left -= n) {
			n = read(fd, buf, left < size ? left : size);
			if (n < 0 && errno == EINTR) {
				n = 0;
				continue;
			}
			if (n <= 0)
				return bench_fail("h2g", size,
						  n ? errname(errno) : "eof");
		}
		dt += now() - t0;
		total += per;
	}
	bench_line("h2g", size, total, dt);
	return 0;
}

static int bench_rtt(int fd)
{
	unsigned char msg[RTT_SIZE], back[RTT_SIZE];
	double t0, dt;
	int i, r;

	fill_random(msg, sizeof(msg));
	for (i = 0; i < 20; i++) {	/* warm up */
		r = echo_once(fd, msg, sizeof(msg), back);
		if (r)
			goto fail;
	}
	t0 = now();
	for (i = 0; i < RTT_COUNT; i++) {
		r = echo_once(fd, msg, sizeof(msg), back);
		if (r)
			goto fail;
	}
	dt = now() - t0;
	printf("VMSOCKET-BENCH %s rtt64 count=%d usec=%.2f rep=%d\n", channel,
	       RTT_COUNT, dt / RTT_COUNT * 1e6, bench_rep);
	fflush(stdout);
	return 0;
fail:
	printf("VMSOCKET-BENCH %s rtt64 FAIL count=%d err=%s rep=%d\n", channel,
	       i, echo_err(r), bench_rep);
	fflush(stdout);
	nfail++;
	return -1;
}

/* One measurement of cell on channel c; a failure ends that channel. */
static void bench_cell(struct bench_channel *c, int cell, unsigned char *buf)
{
	int r;

	channel = c->name;
	if (cell < 3)
		r = bench_g2h(c->kfd, bench_sizes[cell], buf);
	else if (cell < 6)
		r = bench_h2g(c->sfd, bench_sizes[cell - 3], buf);
	else
		r = bench_rtt(c->efd);
	c->failed = r != 0;	/* a request cut short leaves the stream unusable */
}

static int cmd_bench(int argc, char **argv)
{
	struct bench_channel ch[BENCH_MAX_CHANNELS];
	int reps = atoi(argv[0]), nch = (argc - 1) / 4, i, cell;
	unsigned char *buf;

	if (reps < 1 || reps > BENCH_MAX_REPS || nch < 1 ||
	    nch > BENCH_MAX_CHANNELS || (argc - 1) % 4) {
		fprintf(stderr, "bench: REPS 1..%d and 1..%d channels of CHANNEL ECHO SINK SOURCE\n",
			BENCH_MAX_REPS, BENCH_MAX_CHANNELS);
		return 2;
	}
	buf = malloc(bench_sizes[2]);
	if (!buf)
		return 1;
	fill_random(buf, bench_sizes[2]);

	for (i = 0; i < nch; i++) {
		channel = ch[i].name = argv[1 + 4 * i];
		ch[i].efd = open_dev(argv[2 + 4 * i]);
		ch[i].kfd = open_dev(argv[3 + 4 * i]);
		ch[i].sfd = open_dev(argv[4 + 4 * i]);
		ch[i].failed = ch[i].efd < 0 || ch[i].kfd < 0 || ch[i].sfd < 0;
		if (ch[i].failed)
			nfail++;
	}
	for (bench_rep = 0; bench_rep < reps; bench_rep++)
		for (cell = 0; cell < BENCH_CELLS; cell++)
			for (i = 0; i < nch; i++)
				if (!ch[(i + bench_rep) % nch].failed)
					bench_cell(&ch[(i + bench_rep) % nch], cell,
						   buf);

	for (i = 0; i < nch; i++) {
		close(ch[i].efd);
		close(ch[i].kfd);
		close(ch[i].sfd);
	}
	free(buf);
	return nfail ? 1 : 0;
}

/* ---- driver review tests (docs/vmsocket-driver.md) -------------------- */

/*
 * Each test runs the calls that may block in child processes and waits for
 * them with a deadline, so that a driver bug (a task stuck in D state) is a
 * FAIL line and not a hung test run. A stuck child is left behind.
 */

/* Wait up to secs for pid; 1 if it exited, 0 if it is still running. */
static int wait_for(pid_t pid, double secs, int *status)
{
	double end = now() + secs;
	int st = 0;

	while (now() < end) {
		if (waitpid(pid, &st, WNOHANG) == pid) {
			if (status)
				*status = st;
			return 1;
		}
		usleep(10000);
	}
	return 0;
}

static void put_le64_req(int fd, uint64_t len)
{
	unsigned char req[8];

	put_le64(req, len);
	if (write_all(fd, req, sizeof(req)))
		printf("# request write failed: %s\n", errname(errno));
}

/* (1) A reader blocked on a silent peer must not block other open()s. */
static void test_open_while_reader_blocked(const char *silent)
{
	int sync[2], res[2], st;
	double r[4] = { -1, -1, -1, -1 };
	pid_t reader, opener;
	char c;
	int done;

	if (pipe(sync) || pipe(res)) {
		result("open-busy-while-read-blocked", 0, "err=pipe");
		return;
	}
	reader = fork();
	if (reader == 0) {
		int fd = open(silent, O_RDWR);
		char buf[64];

		c = fd < 0 ? 'E' : 'O';
		if (write(sync[1], &c, 1) != 1 || fd < 0)
			_exit(1);
		read(fd, buf, sizeof(buf));	/* silent peer: blocks */
		_exit(0);
	}
	if (read(sync[0], &c, 1) != 1 || c != 'O') {
		result("open-busy-while-read-blocked", 0, "err=reader-open");
		kill(reader, SIGKILL);
		waitpid(reader, NULL, 0);
		return;
	}
	usleep(1000000);		/* let the reader enter read() */
	opener = fork();
	if (opener == 0) {
		double t = now();
		int fd = open(silent, O_RDWR);

		r[0] = fd < 0 ? errno : 0;
		r[1] = now() - t;
		t = now();
		fd = open("/dev/cpu_dma_latency", O_RDONLY);
		r[2] = fd < 0 ? errno : 0;
		r[3] = now() - t;
		if (write(res[1], r, sizeof(r)) != sizeof(r))
			_exit(1);
		_exit(0);
	}
	done = wait_for(opener, 5, &st);
	/* Wake the reader (its read() is interruptible), then collect all. */
	kill(reader, SIGKILL);
	waitpid(reader, NULL, 0);
	if (!done)
		wait_for(opener, 10, &st);
	if (read(res[0], r, sizeof(r)) != sizeof(r))
		memset(r, 0, sizeof(r));
	close(sync[0]);
	close(sync[1]);
	close(res[0]);
	close(res[1]);
	result("open-busy-while-read-blocked",
	       done && r[0] == EBUSY && r[1] < 1 && r[2] == 0 && r[3] < 1,
	       "blocked=%d vmsocket_open=%s seconds=%.3f misc_open=%s seconds=%.3f",
	       !done, r[0] ? errname((int)r[0]) : "ok", r[1],
	       r[2] ? errname((int)r[2]) : "ok", r[3]);
}

struct poller {
	int fd;
	int timeout_ms;
	int ret;
	short revents;
	double seconds;
};

static void *poll_thread(void *arg)
{
	struct poller *p = arg;
	struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
	double t = now();

	p->ret = poll(&pfd, 1, p->timeout_ms);
	p->revents = pfd.revents;
	p->seconds = now() - t;
	return NULL;
}

/*
 * (2) poll() must see data that arrives while, or right after, another
 * thread's write() holds the device (and cancels poll()'s READ).
 */
static void test_poll_wakeup(const char *echo)
{
	static const size_t sizes[] = { 16, 200000, 2u << 20 };
	unsigned char *out, *back;
	int fd, i, lost = 0, errs = 0, rounds = 24;
	double worst = 0, t_written;

	fd = open(echo, O_RDWR);
	out = malloc(2u << 20);
	back = malloc(2u << 20);
	if (fd < 0 || !out || !back) {
		result("poll-wakeup-after-write", 0, "err=open:%s", errname(errno));
		return;
	}
	fill_random(out, 2u << 20);
	for (i = 0; i < rounds; i++) {
		struct poller p = { .fd = fd, .timeout_ms = 4000 };
		size_t n = sizes[i % ARRAY_SIZE(sizes)];
		pthread_t th;

		pthread_create(&th, NULL, poll_thread, &p);
		usleep(i % 2 ? 20000 : 150000);	/* poll() first, usually */
		if (write_all(fd, out, n))
			errs++;
		t_written = now();
		pthread_join(th, NULL);
		/* Late: woken only by poll()'s own timeout, not by the data. */
		if (p.ret != 1 || !(p.revents & POLLIN) || now() - t_written > 1.5)
			lost++;
		if (now() - t_written > worst)
			worst = now() - t_written;
		if (read_exact(fd, back, n, n) || memcmp(out, back, n))
			errs++;
	}
	close(fd);
	free(out);
	free(back);
	result("poll-wakeup-after-write", !lost && !errs,
	       "rounds=%d lost_wakeups=%d errors=%d worst_wake_after_write=%.3f",
	       rounds, lost, errs, worst);
}

/* (3) An O_NONBLOCK read() must collect a READ that completed meanwhile. */
static void test_nonblock_read(const char *silent, int silent_index)
{
	char buf[256];
	int fd, tries, got = 0, eagain_first = 0, first_errno = 0;
	int reset_collected = 0;
	ssize_t r, first = 0;
	double t0;

	fd = open(silent, O_RDWR | O_NONBLOCK);
	if (fd < 0) {
		result("nonblock-read-collects", 0, "err=open:%s", errname(errno));
		return;
	}
	/* The answer may beat the read() (a busy host): try again, bounded. */
	for (tries = 0; tries < 50 && !eagain_first; tries++) {
		put_le64_req(fd, 100);		/* the source answers 100 bytes */
		r = read(fd, buf, sizeof(buf));
		first = r;
		first_errno = r < 0 ? errno : 0;
		if (r < 0 && errno == EAGAIN) {
			eagain_first = 1;
			break;
		}
		/* Data came at once: drain this answer and try again. */
		for (got = r > 0 ? r : 0, t0 = now(); got < 100 && now() - t0 < 3;) {
			r = read(fd, buf, sizeof(buf));
			if (r > 0)
				got += r;
			else
				usleep(10000);
		}
		got = 0;
	}
	for (t0 = now(); eagain_first && got < 100 && now() - t0 < 3;) {
		r = read(fd, buf, sizeof(buf));
		if (r > 0)
			got += r;
		else if (r < 0 && errno != EAGAIN)
			break;
		else
			usleep(20000);
	}
	/*
	 * On a loaded host the source can answer before the READ even starts
	 * (v1 reads inline), every time. Then make the pending READ complete
	 * without data: nothing requested, read() gives EAGAIN for sure, and
	 * the host drops the connection (VMSOCKET-HOST-DROP, harness): the
	 * READ ends with ECONNRESET, which later reads must collect.
	 */
	if (!eagain_first && silent_index >= 0) {
		r = read(fd, buf, sizeof(buf));
		if (r < 0 && errno == EAGAIN) {
			printf("VMSOCKET-HOST-DROP %d\n", silent_index);
			fflush(stdout);
			for (t0 = now(); now() - t0 < 5; usleep(20000)) {
				r = read(fd, buf, sizeof(buf));
				if (!(r < 0 && errno == EAGAIN))
					break;
			}
			reset_collected = r < 0 && errno == ECONNRESET;
		}
	}
	close(fd);
	result("nonblock-read-collects",
	       (eagain_first && got == 100) || reset_collected,
	       "first_read_eagain=%d bytes=%d of=100 tries=%d last_first_read=%zd errno=%s reset_collected=%d",
	       eagain_first, got, tries + 1, first,
	       first < 0 ? errname(first_errno) : "none", reset_collected);
}

/* (4a) poll() for POLLOUT only must not start a READ (STATUS via BAR0). */
static volatile uint32_t *map_regs(const char *dev);

static void test_pollout_no_read(const char *echo)
{
	volatile uint32_t *regs = map_regs(echo);
	struct pollfd pfd = { .events = POLLOUT };
	int fd, ret = -1;
	int32_t status = 1;

	fd = open(echo, O_RDWR);
	if (!regs || fd < 0) {
		result("poll-pollout-starts-no-read", 0, "err=setup:%s",
		       errname(errno));
		return;
	}
	pfd.fd = fd;
	ret = poll(&pfd, 1, 0);
	status = (int32_t)regs[0];	/* -115 (EINPROGRESS): a READ runs */
	close(fd);
	munmap((void *)regs, 4096);
	result("poll-pollout-starts-no-read",
	       ret == 1 && pfd.revents == POLLOUT && status != -EINPROGRESS,
	       "revents=%#x status_after_poll=%d", pfd.revents, status);
}

/*
 * (4b) No POLLOUT while the peer does not take what was written: a
 * non-blocking writer that polls must sleep, not spin. A spin is poll()
 * saying POLLOUT and the very next write() failing with EAGAIN.
 */
static void test_pollout_stall(const char *stall)
{
	static char chunk[65536];
	struct pollfd pfd;
	int fd, i, ret, stalled = 0, spins = 0, eagains = 0;
	long total = 0;
	ssize_t r;

	fd = open(stall, O_RDWR | O_NONBLOCK);
	if (fd < 0) {
		result("poll-no-pollout-when-peer-stalls", 0, "err=open:%s",
		       errname(errno));
		return;
	}
	/* The source sends 2^40 bytes: it blocks writing and stops reading. */
	put_le64_req(fd, 1ULL << 40);
	usleep(500000);
	for (i = 0; i < 400 && !stalled && spins < 20; i++) {
		r = write(fd, chunk, sizeof(chunk));
		if (r > 0) {
			total += r;
			continue;
		}
		if (r < 0 && errno != EAGAIN)
			break;
		eagains++;
		pfd.fd = fd;
		pfd.events = POLLOUT;
		pfd.revents = 0;
		ret = poll(&pfd, 1, 1000);
		if (ret == 0) {
			stalled = 1;
			break;
		}
		r = write(fd, chunk, sizeof(chunk));
		if (r > 0)
			total += r;
		else if (r < 0 && errno == EAGAIN)
			spins++;
	}
	close(fd);
	result("poll-no-pollout-when-peer-stalls", stalled && !spins,
	       "written=%ld eagains=%d poll_timed_out=%d spins=%d", total,
	       eagains, stalled, spins);
}

/* (4c) End of file: POLLIN|POLLRDHUP; after EPIPE: POLLHUP. */
static void test_poll_eof(const char *hangup)
{
	struct pollfd pfd;
	short ev_eof = 0, ev_pipe = 0;
	int fd, ret, e = 0;
	char buf[16];
	ssize_t r, w;
	double t0;

	fd = open(hangup, O_RDWR);
	if (fd < 0) {
		result("poll-eof-rdhup-hup", 0, "err=open:%s", errname(errno));
		return;
	}
	pfd.fd = fd;
	pfd.events = POLLIN | POLLRDHUP;
	ret = poll(&pfd, 1, 3000);
	ev_eof = pfd.revents;
	r = read(fd, buf, sizeof(buf));
	/*
	 * v1 sends at once and fails. Stream mode queues the byte in the
	 * output ring (write() returns 1) and the device's send fails after:
	 * the next write() reports it, like a socket's.
	 */
	for (t0 = now(); (w = write(fd, "x", 1)) == 1 && now() - t0 < 3;)
		usleep(10000);
	if (w < 0)
		e = errno;
	pfd.events = POLLIN | POLLOUT | POLLRDHUP;
	poll(&pfd, 1, 0);
	ev_pipe = pfd.revents;
	close(fd);
	result("poll-eof-rdhup-hup",
	       ret == 1 && (ev_eof & (POLLIN | POLLRDHUP)) == (POLLIN | POLLRDHUP) &&
	       r == 0 && w < 0 && (e == EPIPE || e == ECONNRESET) &&
	       (ev_pipe & POLLHUP),
	       "eof_revents=%#x read=%zd write_errno=%s after_revents=%#x",
	       ev_eof, r, w < 0 ? errname(e) : "none", ev_pipe);
}

/* The BAR0 registers of the PCI function behind /dev/NAME, mapped. */
static volatile uint32_t *map_regs(const char *dev)
{
	char path[256];
	void *p;
	int fd;

	snprintf(path, sizeof(path), "/sys/class/misc/%s/device/resource0",
		 strrchr(dev, '/') + 1);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		return NULL;
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	return p == MAP_FAILED ? NULL : p;
}

/* "0000:00:14.0" behind /dev/NAME */
static int pci_name(const char *dev, char *out, size_t len)
{
	char path[256], link[256];
	ssize_t n;

	snprintf(path, sizeof(path), "/sys/class/misc/%s/device",
		 strrchr(dev, '/') + 1);
	n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		return -1;
	link[n] = 0;
	snprintf(out, len, "%s", strrchr(link, '/') + 1);
	return 0;
}

static int sysfs_write(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY), ok;

	if (fd < 0)
		return -errno;
	ok = write(fd, val, strlen(val)) == (ssize_t)strlen(val);
	close(fd);
	return ok ? 0 : -errno;
}

/* Wait (bounded) until /dev/NAME exists again after a rebind. */
static int wait_dev(const char *dev)
{
	int i;

	for (i = 0; i < 100; i++) {
		if (access(dev, F_OK) == 0)
			return 0;
		usleep(50000);
	}
	return -1;
}

/*
 * (7) After kexec the device keeps the old kernel's connection. Simulated:
 * a raw register user CONNECTs behind the driver, then the driver is
 * rebound; probe must reset the device so that open() works.
 */
static void test_probe_resets(const char *echo2)
{
	volatile uint32_t *regs = map_regs(echo2);
	char bdf[64], back[sizeof(hello)];
	int fd, e = 0, before, after = -1;

	if (!regs || pci_name(echo2, bdf, sizeof(bdf))) {
		result("probe-resets-device", 0, "err=map:%s", errname(errno));
		return;
	}
	*(volatile uint16_t *)((volatile char *)regs + 0x20) = 1; /* CONNECT */
	usleep(100000);
	fd = open(echo2, O_RDWR);
	before = fd < 0 ? errno : 0;
	if (fd >= 0)
		close(fd);
	munmap((void *)regs, 4096);
	if (sysfs_write("/sys/bus/pci/drivers/kvm_vmsocket/unbind", bdf) ||
	    sysfs_write("/sys/bus/pci/drivers/kvm_vmsocket/bind", bdf) ||
	    wait_dev(echo2)) {
		result("probe-resets-device", 0, "err=rebind:%s", errname(errno));
		return;
	}
	fd = open(echo2, O_RDWR);
	if (fd < 0) {
		e = errno;
	} else {
		after = echo_once(fd, hello, sizeof(hello) - 1, back);
		close(fd);
	}
	result("probe-resets-device", fd >= 0 && after == 0,
	       "open_before_rebind=%s open_after_rebind=%s echo=%s",
	       before ? errname(before) : "ok", fd < 0 ? errname(e) : "ok",
	       after == 0 ? "ok" : after < 0 && fd >= 0 ? echo_err(after) : "none");
}

/* (7) Suspend (pm_test=devices) closes the connection; the device works after. */
static void test_suspend(const char *echo)
{
	char back[sizeof(hello)], buf[16];
	int fd, r0, fd2, r2 = -1, e_read = 0, e_open = 0, susp;
	double t;
	ssize_t r;

	fd = open(echo, O_RDWR);
	if (fd < 0) {
		result("suspend-closes-connection", 0, "err=open:%s", errname(errno));
		return;
	}
	r0 = echo_once(fd, hello, sizeof(hello) - 1, back);
	/* Device callbacks only: pm_test=devices resumes after 5 s. */
	sysfs_write("/sys/power/mem_sleep", "deep");
	susp = sysfs_write("/sys/power/pm_test", "devices");
	if (!susp)
		susp = sysfs_write("/sys/power/state", "mem");
	sysfs_write("/sys/power/pm_test", "none");
	alarm(3);			/* a live connection stays silent */
	r = read(fd, buf, sizeof(buf));
	if (r < 0)
		e_read = errno;
	alarm(0);
	close(fd);
	t = now();
	fd2 = open(echo, O_RDWR);
	if (fd2 < 0) {
		e_open = errno;
	} else {
		r2 = echo_once(fd2, hello, sizeof(hello) - 1, back);
		close(fd2);
	}
	t = now() - t;
	result("suspend-closes-connection",
	       !r0 && !susp && r < 0 && e_read == ECONNRESET && fd2 >= 0 && !r2 &&
	       t < 0.5,
	       "suspend=%s old_fd_read=%zd errno=%s reopen=%s echo=%s seconds=%.3f",
	       susp ? errname(-susp) : "ok", r, r < 0 ? errname(e_read) : "none",
	       fd2 < 0 ? errname(e_open) : "ok",
	       r2 == 0 ? "ok" : r2 == -1 ? "none" : echo_err(r2), t);
}

/*
 * (6) An action the driver did not start is pending (a raw register user
 * started a READ on a silent peer): close() must not wait for it forever
 * (D state); afterwards the device must be usable again.
 */
static int test_foreign_pending(const char *foreign)
{
	volatile uint32_t *regs = map_regs(foreign);
	int fd, done, st, fd2 = -1, e2 = 0;
	pid_t closer;

	fd = open(foreign, O_RDWR);
	if (!regs || fd < 0) {
		result("close-with-foreign-pending-action", 0, "err=setup:%s",
		       errname(errno));
		return 0;
	}
	regs[0x60 / 4] = 4096;		/* READ behind the driver's back */
	usleep(100000);
	closer = fork();
	if (closer == 0) {
		close(fd);
		_exit(0);
	}
	close(fd);			/* the child holds the last reference */
	done = wait_for(closer, 15, &st);
	if (done) {
		fd2 = open(foreign, O_RDWR);
		if (fd2 < 0)
			e2 = errno;
		else
			close(fd2);
	}
	munmap((void *)regs, 4096);
	result("close-with-foreign-pending-action", done && fd2 >= 0,
	       "close_returned=%d reopen=%s", done,
	       !done ? "not-tried" : fd2 < 0 ? errname(e2) : "ok");
	return done;
}

static volatile int hammer_stop;

/*
 * (6) A device that never lets an action end (a raw register user re-arms
 * READ as soon as anything cancels it): every call must come back in bounded
 * time, and once the driver gave up, report EIO (and POLLERR).
 */
static void test_cancel_timeout(const char *foreign)
{
	volatile uint32_t *regs = map_regs(foreign);
	struct pollfd pfd;
	pid_t hammer, worker;
	int fd, st, done, res[2];
	int out[4] = { 0, 0, 0, 0 };

	fd = open(foreign, O_RDWR);
	if (!regs || fd < 0 || pipe(res)) {
		result("hammered-device-calls-return", 0, "err=setup:%s",
		       errname(errno));
		return;
	}
	hammer = fork();
	if (hammer == 0) {
		double end = now() + 45;

		while (now() < end)
			regs[0x60 / 4] = 4096;
		_exit(0);
	}
	usleep(200000);
	worker = fork();
	if (worker == 0) {
		struct sigaction sa;
		char buf[64];
		ssize_t r;

		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_alarm;
		sigaction(SIGALRM, &sa, NULL);
		for (out[3] = 1; out[3] <= 3; out[3]++) {
			alarm(1);
			r = read(fd, buf, sizeof(buf));	/* CANCEL times out */
			alarm(0);
			out[0] = r < 0 ? errno : 0;
			if (out[0] == EIO)
				break;
		}
		alarm(3);
		r = write(fd, "x", 1);
		alarm(0);
		out[1] = r < 0 ? errno : 0;
		pfd.fd = fd;
		pfd.events = POLLIN | POLLOUT;
		poll(&pfd, 1, 0);
		out[2] = pfd.revents;
		close(fd);
		if (write(res[1], out, sizeof(out)) != sizeof(out))
			_exit(1);
		_exit(0);
	}
	close(fd);
	done = wait_for(worker, 60, &st);
	kill(hammer, SIGKILL);
	waitpid(hammer, NULL, 0);
	if (!done || read(res[0], out, sizeof(out)) != sizeof(out))
		memset(out, 0, sizeof(out));
	munmap((void *)regs, 4096);
	/*
	 * Whether a CANCEL times out depends on the raw user winning a race
	 * with the driver's STATUS read; when it does (read() gives EIO), the
	 * driver must stay broken: write() EIO, POLLERR. Either way every call
	 * must come back.
	 */
	result("hammered-device-calls-return",
	       done && (out[0] != EIO || (out[1] == EIO && (out[2] & POLLERR))),
	       "returned=%d cancel_timed_out=%d read=%s reads=%d write=%s revents=%#x",
	       done, out[0] == EIO,
	       out[0] ? errname(out[0]) : "ok", out[3],
	       out[1] ? errname(out[1]) : "ok", out[2]);
}

/* ---- stream mode (ABI v2) tests --------------------------------------- */

/* The driver's "stream" parameter: 1, 0, or -1 if unreadable. */
static int stream_param(void)
{
	int fd = open("/sys/module/kvm_vmsocket/parameters/stream", O_RDONLY);
	char c = 0;

	if (fd < 0)
		return -1;
	if (read(fd, &c, 1) != 1)
		c = 0;
	close(fd);
	return c == 'Y' ? 1 : c == 'N' ? 0 : -1;
}

static int set_stream_param(int on)
{
	return sysfs_write("/sys/module/kvm_vmsocket/parameters/stream",
			   on ? "1" : "0");
}

/*
 * Whether this open()'s connection runs in stream mode: the device has
 * FEATURES.STREAM (BAR0 0x14, read through sysfs) and the driver's
 * parameter "stream" is on (both are read at open()).
 */
static int stream_mode(const char *dev)
{
	volatile uint32_t *regs = map_regs(dev);
	int features;

	if (!regs)
		return -1;
	features = regs[0x14 / 4] & 1;
	munmap((void *)regs, 4096);
	return features && stream_param() == 1;
}

struct blocked_reader {
	int fd;
	ssize_t ret;
	int err;
	double returned_at;
};

static void *blocked_reader_thread(void *arg)
{
	struct blocked_reader *b = arg;
	char buf[64];

	b->ret = read(b->fd, buf, sizeof(buf));	/* silent peer: blocks */
	b->err = errno;
	b->returned_at = now();
	return NULL;
}

struct killer {
	pthread_t target;
	volatile int cancel;
	volatile double fired_after;
};

/* After 2 s, unless cancelled, interrupt the blocked reader (SIGALRM). */
static void *killer_thread(void *arg)
{
	struct killer *k = arg;
	double t0 = now();

	while (now() - t0 < 2.0) {
		if (k->cancel)
			return NULL;
		usleep(10000);
	}
	k->fired_after = now() - t0;
	pthread_kill(k->target, SIGALRM);
	return NULL;
}

/*
 * (v2) Full duplex: a thread blocked in read() on a silent peer must not
 * delay another thread's write() on the same file. Ten 8-byte writes (a
 * source request of 0 bytes: the peer stays silent) while the reader
 * waits. In v1 the device is half-duplex and the driver serialises the
 * actions: the first write waits until the read gives up (a signal at
 * 2 s), so the same test shows the delay there ("PASS" means "as the
 * mode promises").
 */
static void test_full_duplex(const char *silent)
{
	struct blocked_reader b = { .ret = 1 };
	struct killer k = { .fired_after = 0 };
	double t0, worst = 0;
	pthread_t th, kt;
	int fd, i, mode, errs = 0, still_blocked;

	mode = stream_mode(silent);
	fd = open(silent, O_RDWR);
	if (fd < 0 || mode < 0) {
		result("full-duplex-write-while-read-blocked", 0, "err=open:%s",
		       errname(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	b.fd = fd;
	pthread_create(&th, NULL, blocked_reader_thread, &b);
	usleep(300000);			/* let the reader block in read() */
	k.target = th;
	pthread_create(&kt, NULL, killer_thread, &k);
	for (i = 0; i < 10; i++) {
		t0 = now();
		if (write_all(fd, "\0\0\0\0\0\0\0\0", 8))
			errs++;
		if (now() - t0 > worst)
			worst = now() - t0;
	}
	k.cancel = 1;
	pthread_join(kt, NULL);
	still_blocked = b.ret == 1;
	if (still_blocked)
		pthread_kill(th, SIGALRM);
	pthread_join(th, NULL);
	close(fd);
	if (mode)
		result("full-duplex-write-while-read-blocked",
		       !errs && still_blocked && worst < 0.25,
		       "mode=stream writes=10 worst_write_seconds=%.6f reader_blocked_meanwhile=%d errors=%d",
		       worst, still_blocked, errs);
	else
		result("full-duplex-write-while-read-blocked",
		       !errs && worst >= 1.5 && k.fired_after > 0,
		       "mode=v1 writes=10 worst_write_seconds=%.6f half_duplex_delay=%d read_interrupted_after=%.3f errors=%d",
		       worst, worst >= 1.5, k.fired_after, errs);
}

struct integrity {
	int fd;
	const unsigned char *data;
	size_t total;
	int err;
};

/* Odd sizes: every write and read crosses the ring's wrap sooner or later. */
static const size_t odd_writes[] = { 1, 4093, 65537, 333331, 7, 1048573,
				     12345, 999, 262147, 3 };
static const size_t odd_reads[] = { 3, 1021, 65521, 777777, 1, 131071, 4099 };

static void *integrity_writer(void *arg)
{
	struct integrity *w = arg;
	size_t off = 0, n;
	int i = 0;

	while (off < w->total) {
		n = odd_writes[i++ % ARRAY_SIZE(odd_writes)];
		if (n > w->total - off)
			n = w->total - off;
		w->err = write_all(w->fd, w->data + off, n);
		if (w->err)
			break;
		off += n;
	}
	return NULL;
}

/*
 * (v2) Data integrity through the echo peer, both ways at once: one thread
 * writes 6 MiB + 5 bytes in odd sizes (the rings are 1 MiB: they wrap many
 * times) while this one reads with other odd sizes and compares. v1 cannot
 * run a blocking read and write at once (half-duplex): there, each odd
 * write is echoed back before the next.
 */
static void test_stream_integrity(const char *echo)
{
	size_t total = (6u << 20) + 5, got = 0, n, mism = ~(size_t)0;
	struct integrity w = { .total = total };
	unsigned char *data = malloc(total), *back = malloc(total);
	int fd, mode, i = 0, rerr = 0;
	double t0 = now();
	pthread_t th;
	ssize_t r;

	mode = stream_mode(echo);
	fd = open(echo, O_RDWR);
	if (fd < 0 || !data || !back || mode < 0) {
		result("stream-integrity-odd-sizes", 0, "err=open:%s",
		       errname(errno));
		if (fd >= 0)
			close(fd);
		free(data);
		free(back);
		return;
	}
	fill_random(data, total);
	w.fd = fd;
	w.data = data;
	if (mode) {
		pthread_create(&th, NULL, integrity_writer, &w);
		while (got < total) {
			n = odd_reads[i++ % ARRAY_SIZE(odd_reads)];
			if (n > total - got)
				n = total - got;
			r = read(fd, back + got, n);
			if (r <= 0) {
				rerr = r < 0 ? errno : EPIPE;
				break;
			}
			got += r;
		}
		pthread_join(th, NULL);
	} else {
		size_t off = 0;

		while (off < total && !rerr && !w.err) {
			n = odd_writes[i++ % ARRAY_SIZE(odd_writes)];
			if (n > total - off)
				n = total - off;
			w.err = write_all(fd, data + off, n);
			if (!w.err)
				rerr = -read_exact(fd, back + off, n, n);
			off += n;
		}
		got = rerr || w.err ? 0 : off;
	}
	close(fd);
	for (n = 0; n < got; n++) {
		if (data[n] != back[n]) {
			mism = n;
			break;
		}
	}
	result("stream-integrity-odd-sizes",
	       got == total && !w.err && !rerr && mism == ~(size_t)0,
	       "mode=%s bytes=%zu of=%zu write_err=%s read_err=%s first_mismatch=%zd seconds=%.3f fnv=%016" PRIx64,
	       mode ? "stream" : "v1", got, total,
	       w.err ? errname(-w.err) : "none", rerr ? errname(rerr) : "none",
	       mism == ~(size_t)0 ? (ssize_t)-1 : (ssize_t)mism, now() - t0,
	       fnv1a(0xcbf29ce484222325ULL, data, total));
	free(data);
	free(back);
}

/*
 * (v2) The same odd-size stream through the echo peer from one thread
 * with O_NONBLOCK and poll(POLLIN|POLLOUT): writes what fits, reads what
 * is there. Exercises EAGAIN, POLLOUT (a quarter of the ring free in
 * stream mode) and the interrupts poll() arms. A poll() that times out
 * (2 s) with bytes still in flight is a lost wakeup.
 */
static void test_poll_integrity(const char *echo)
{
	size_t total = (6u << 20) + 5, sent = 0, got = 0, n, mism = ~(size_t)0;
	unsigned char *data = malloc(total), *back = malloc(total);
	int fd, mode, wi = 0, ri = 0, timeouts = 0, eagains = 0, err = 0;
	double t0 = now();
	struct pollfd pfd;
	ssize_t r;

	mode = stream_mode(echo);
	fd = open(echo, O_RDWR | O_NONBLOCK);
	if (fd < 0 || !data || !back || mode < 0) {
		result("poll-nonblock-integrity", 0, "err=open:%s", errname(errno));
		if (fd >= 0)
			close(fd);
		free(data);
		free(back);
		return;
	}
	fill_random(data, total);
	while (got < total && !err && now() - t0 < 60) {
		pfd.fd = fd;
		pfd.events = POLLIN | (sent < total ? POLLOUT : 0);
		pfd.revents = 0;
		if (poll(&pfd, 1, 2000) == 0) {
			timeouts++;
			continue;
		}
		if (pfd.revents & (POLLERR | POLLHUP | POLLNVAL)) {
			err = EPIPE;
			break;
		}
		if ((pfd.revents & POLLOUT) && sent < total) {
			n = odd_writes[wi % ARRAY_SIZE(odd_writes)];
			if (n > total - sent)
				n = total - sent;
			r = write(fd, data + sent, n);
			if (r > 0) {
				sent += r;
				if ((size_t)r == n)
					wi++;
			} else if (r < 0 && errno == EAGAIN) {
				eagains++;
			} else {
				err = r < 0 ? errno : EIO;
			}
		}
		if (pfd.revents & POLLIN) {
			n = odd_reads[ri++ % ARRAY_SIZE(odd_reads)];
			if (n > total - got)
				n = total - got;
			r = read(fd, back + got, n);
			if (r > 0)
				got += r;
			else if (r == 0)
				err = EPIPE;
			else if (errno != EAGAIN)
				err = errno;
		}
	}
	close(fd);
	for (n = 0; n < got; n++) {
		if (data[n] != back[n]) {
			mism = n;
			break;
		}
	}
	result("poll-nonblock-integrity",
	       got == total && !err && !timeouts && mism == ~(size_t)0,
	       "mode=%s sent=%zu bytes=%zu of=%zu err=%s poll_timeouts=%d write_eagains=%d first_mismatch=%zd seconds=%.3f",
	       mode ? "stream" : "v1", sent, got, total,
	       err ? errname(err) : "none", timeouts, eagains,
	       mism == ~(size_t)0 ? (ssize_t)-1 : (ssize_t)mism, now() - t0);
	free(data);
	free(back);
}

/*
 * (v2) The host drops the connection (QOM connected=false, asked for on
 * the console: the harness watches for VMSOCKET-HOST-DROP <device index>):
 * a blocked read() returns ECONNRESET, so does write(), poll() says
 * POLLHUP|POLLERR, and a new open() works.
 */
static void test_host_drop(const char *echo, int index)
{
	char back[sizeof(hello)], buf[64];
	struct pollfd pfd;
	int fd, r0, e_read = 0, e_write = 0, fd2, r2 = -1, mode;
	double t0, t_read;
	ssize_t r, w;

	mode = stream_mode(echo);
	fd = open(echo, O_RDWR);
	if (fd < 0) {
		result("host-drop-econnreset", 0, "err=open:%s", errname(errno));
		return;
	}
	r0 = echo_once(fd, hello, sizeof(hello) - 1, back);
	printf("VMSOCKET-HOST-DROP %d\n", index);
	fflush(stdout);
	t0 = now();
	alarm(20);
	r = read(fd, buf, sizeof(buf));
	if (r < 0)
		e_read = errno;
	alarm(0);
	t_read = now() - t0;
	w = write(fd, hello, sizeof(hello) - 1);
	if (w < 0)
		e_write = errno;
	pfd.fd = fd;
	pfd.events = POLLIN | POLLOUT;
	pfd.revents = 0;
	poll(&pfd, 1, 0);
	close(fd);
	fd2 = open(echo, O_RDWR);
	if (fd2 >= 0) {
		r2 = echo_once(fd2, hello, sizeof(hello) - 1, back);
		close(fd2);
	}
	result("host-drop-econnreset",
	       !r0 && r < 0 && e_read == ECONNRESET && w < 0 &&
	       e_write == ECONNRESET && (pfd.revents & POLLHUP) &&
	       (!mode || (pfd.revents & POLLERR)) && fd2 >= 0 && !r2,
	       "mode=%s read=%zd errno=%s read_seconds=%.3f write_errno=%s revents=%#x reopen=%s",
	       mode ? "stream" : "v1", r, r < 0 ? errname(e_read) : "none",
	       t_read, w < 0 ? errname(e_write) : "none", pfd.revents,
	       fd2 < 0 ? errname(errno) : r2 ? echo_err(r2) : "ok");
}

/*
 * (7, v2) Unbind (hot unplug) while a reader is blocked in read():
 * remove() must wake the reader (ENODEV), wait until no reader or writer
 * is in the rings, and return; the open file then gives
 * ENODEV and POLLERR|POLLHUP; after a rebind the device works. The unbind
 * runs in a child with a deadline (a deadlock would leave it in D state).
 */
static void test_unbind_blocked(const char *echo2)
{
	struct blocked_reader b = { .ret = 1 };
	char bdf[64], back[sizeof(hello)];
	int fd, fd2, st, done, w_err = 0, after = -1, mode;
	struct pollfd pfd = { .events = POLLIN | POLLOUT };
	double t0, t_reader = -1;
	pthread_t th;
	pid_t pid;
	ssize_t w;

	mode = stream_mode(echo2);
	fd = open(echo2, O_RDWR);
	if (fd < 0 || pci_name(echo2, bdf, sizeof(bdf)) || mode < 0) {
		result("unbind-with-blocked-reader", 0, "err=open:%s",
		       errname(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	b.fd = fd;
	pthread_create(&th, NULL, blocked_reader_thread, &b);
	usleep(300000);			/* the reader blocks: nothing was sent */
	t0 = now();
	pid = fork();
	if (pid == 0)
		_exit(sysfs_write("/sys/bus/pci/drivers/kvm_vmsocket/unbind",
				  bdf) ? 1 : 0);
	done = wait_for(pid, 20, &st);
	/* the reader must be out by now; give it a moment, then free it */
	for (st = 0; st < 100 && b.ret == 1; st++)
		usleep(50000);
	if (b.ret == 1)
		pthread_kill(th, SIGALRM);
	else
		t_reader = b.returned_at - t0;
	pthread_join(th, NULL);
	w = write(fd, hello, sizeof(hello) - 1);
	if (w < 0)
		w_err = errno;
	pfd.fd = fd;
	poll(&pfd, 1, 0);
	close(fd);
	if (done && !sysfs_write("/sys/bus/pci/drivers/kvm_vmsocket/bind", bdf) &&
	    !wait_dev(echo2)) {
		fd2 = open(echo2, O_RDWR);
		if (fd2 >= 0) {
			after = echo_once(fd2, hello, sizeof(hello) - 1, back);
			close(fd2);
		}
	}
	result("unbind-with-blocked-reader",
	       done && b.ret < 0 && b.err == ENODEV && t_reader >= 0 &&
	       t_reader < 6 && w < 0 && w_err == ENODEV &&
	       (pfd.revents & (POLLERR | POLLHUP)) == (POLLERR | POLLHUP) &&
	       after == 0,
	       "mode=%s unbind_returned=%d read=%zd errno=%s reader_seconds=%.3f write_errno=%s revents=%#x rebind_echo=%s",
	       mode ? "stream" : "v1", done, b.ret,
	       b.ret < 0 ? errname(b.err) : "none", t_reader,
	       w < 0 ? errname(w_err) : "none", pfd.revents,
	       after == 0 ? "ok" : after == -1 ? "none" : echo_err(after));
}

/*
 * (5) The device lies about STATUS (x-lie-action/x-lie-status): open()
 * must fail with EIO for a CONNECT status below -4095 (-600), a kernel-
 * internal code (-512) and a positive one, in a child with a deadline.
 */
static void test_lie_connect(const char *name, const char *dev)
{
	int res[2], e = 0, st, done;
	pid_t pid;
	double t0 = now();

	if (pipe(res)) {
		result(name, 0, "err=pipe");
		return;
	}
	pid = fork();
	if (pid == 0) {
		int fd = open(dev, O_RDWR);

		e = fd < 0 ? errno : 0;
		if (fd >= 0)
			close(fd);
		if (write(res[1], &e, sizeof(e)) != sizeof(e))
			_exit(1);
		_exit(0);
	}
	done = wait_for(pid, 10, &st);
	if (!done || read(res[0], &e, sizeof(e)) != sizeof(e))
		e = -1;
	close(res[0]);
	close(res[1]);
	result(name, done && e == EIO, "returned=%d open=%s seconds=%.3f",
	       done, e < 0 ? "none" : e ? errname(e) : "ok", now() - t0);
}

/*
 * (5) v1 path (stream=0): a WRITECOMMIT that reports 0 bytes for len > 0
 * gives EIO (not 0, which made write_all() loop for ever); a READ that
 * reports -513 (ERESTARTNOINTR) gives EIO, not an endless restart.
 */
static void test_lie_v1(const char *name, const char *dev, int is_write)
{
	int res[2], out[2] = { -1, -1 }, st, done, was = stream_param();
	pid_t pid;
	double t0 = now();

	if (was < 0 || pipe(res) || set_stream_param(0)) {
		result(name, 0, "err=setup");
		return;
	}
	pid = fork();
	if (pid == 0) {
		int fd = open(dev, O_RDWR);
		char buf[64];
		ssize_t r;

		out[0] = fd < 0 ? errno : 0;
		if (fd >= 0) {
			if (is_write) {
				r = write(fd, hello, sizeof(hello) - 1);
			} else {
				if (write_all(fd, hello, sizeof(hello) - 1))
					_exit(1);
				r = read(fd, buf, sizeof(buf));
			}
			out[1] = r < 0 ? errno : r == 0 ? 0 : 1000 + (int)r;
			close(fd);
		}
		if (write(res[1], out, sizeof(out)) != sizeof(out))
			_exit(1);
		_exit(0);
	}
	done = wait_for(pid, 15, &st);
	set_stream_param(was);
	if (!done) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
	}
	if (!done || read(res[0], out, sizeof(out)) != sizeof(out))
		out[0] = out[1] = -1;
	close(res[0]);
	close(res[1]);
	result(name, done && out[0] == 0 && out[1] == EIO,
	       "returned=%d open=%s %s=%s seconds=%.3f", done,
	       out[0] < 0 ? "none" : out[0] ? errname(out[0]) : "ok",
	       is_write ? "write" : "read",
	       out[1] < 0 ? "none" : out[1] >= 1000 ? "bytes" :
	       out[1] ? errname(out[1]) : "0", now() - t0);
}

static char **only;

/* With test names after the devices, run only those. */
static int want(const char *name)
{
	char **p;

	if (!only || !*only)
		return 1;
	for (p = only; *p; p++)
		if (!strcmp(*p, name))
			return 1;
	return 0;
}

static int cmd_driver(char **dev)
{
	struct sigaction sa;
	int foreign_ok = 1;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART */
	sigaction(SIGALRM, &sa, NULL);
	only = dev + 11;
	if (stream_param() == 0)
		name_suffix = "@v1";
	if (want("full-duplex-write-while-read-blocked"))
		test_full_duplex(dev[1]);
	if (want("stream-integrity-odd-sizes"))
		test_stream_integrity(dev[0]);
	if (want("poll-nonblock-integrity"))
		test_poll_integrity(dev[0]);
	if (want("host-drop-econnreset"))
		test_host_drop(dev[0], 0);
	if (want("lie-connect-below-max-errno"))
		test_lie_connect("lie-connect-below-max-errno", dev[6]);
	if (want("lie-connect-kernel-internal"))
		test_lie_connect("lie-connect-kernel-internal", dev[7]);
	if (want("lie-connect-positive"))
		test_lie_connect("lie-connect-positive", dev[8]);
	if (want("lie-writecommit-zero"))
		test_lie_v1("lie-writecommit-zero", dev[9], 1);
	if (want("lie-read-kernel-internal"))
		test_lie_v1("lie-read-kernel-internal", dev[10], 0);
	if (want("open-busy-while-read-blocked"))
		test_open_while_reader_blocked(dev[1]);
	if (want("poll-wakeup-after-write"))
		test_poll_wakeup(dev[0]);
	if (want("nonblock-read-collects"))
		test_nonblock_read(dev[1], 1);
	if (want("poll-pollout-starts-no-read"))
		test_pollout_no_read(dev[0]);
	if (want("poll-no-pollout-when-peer-stalls"))
		test_pollout_stall(dev[3]);
	if (want("poll-eof-rdhup-hup"))
		test_poll_eof(dev[2]);
	if (want("probe-resets-device"))
		test_probe_resets(dev[5]);
	if (want("unbind-with-blocked-reader"))
		test_unbind_blocked(dev[5]);
	if (want("close-with-foreign-pending-action"))
		foreign_ok = test_foreign_pending(dev[4]);
	if (want("hammered-device-calls-return")) {
		if (foreign_ok)
			test_cancel_timeout(dev[4]);
		else
			result("hammered-device-calls-return", 0,
			       "err=device-wedged-by-previous-test");
	}
	if (want("suspend-closes-connection"))
		test_suspend(dev[0]);	/* last: a hung suspend ends the run */
	printf("VMSOCKET-TEST-DONE pass=%d fail=%d\n", npass, nfail);
	return nfail ? 1 : 0;
}

static int usage(void)
{
	fprintf(stderr,
		"usage: vmsocket-test selftest DEV\n"
		"       vmsocket-test refused DEV\n"
		"       vmsocket-test signal DEV\n"
		"       vmsocket-test bench REPS CHANNEL ECHO SINK SOURCE [CHANNEL ECHO SINK SOURCE]...\n"
		"       vmsocket-test driver ECHO SILENT HANGUP STALL FOREIGN ECHO2\n"
		"                            LIE_CONN600 LIE_CONN512 LIE_CONNPOS LIE_WRITE0\n"
		"                            LIE_READ513 [TEST...]\n");
	return 2;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);

	if (argc == 3 && !strcmp(argv[1], "selftest"))
		return cmd_selftest(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "refused"))
		return cmd_refused(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "signal"))
		return cmd_signal(argv[2]);
	if (argc >= 7 && !strcmp(argv[1], "bench"))
		return cmd_bench(argc - 2, argv + 2);
	if (argc >= 13 && !strcmp(argv[1], "driver"))
		return cmd_driver(argv + 2);
	return usage();
}
