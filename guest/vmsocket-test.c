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
 *   vmsocket-test bench CHANNEL ECHO_DEV SINK_DEV SOURCE_DEV
 *     VMSOCKET-BENCH <channel> <g2h|h2g> size=<n> bytes=<total> seconds=<s> mbps=<MB/s>
 *     VMSOCKET-BENCH <channel> rtt64 count=<n> usec=<mean>
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

static void result(const char *name, int ok, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void result(const char *name, int ok, const char *fmt, ...)
{
	va_list ap;

	printf("VMSOCKET-TEST %s %s", name, ok ? "PASS" : "FAIL");
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

static const char *channel;

static int open_dev(const char *dev)
{
	int fd = open(dev, O_RDWR);

	if (fd < 0)
		printf("VMSOCKET-BENCH %s open FAIL dev=%s err=%s\n", channel,
		       dev, errname(errno));
	return fd;
}

static void bench_line(const char *dir, size_t size, uint64_t bytes, double s)
{
	printf("VMSOCKET-BENCH %s %s size=%zu bytes=%" PRIu64
	       " seconds=%.3f mbps=%.1f\n", channel, dir, size, bytes, s,
	       s > 0 ? bytes / s / 1e6 : 0.0);
	fflush(stdout);
}

static int bench_fail(const char *dir, size_t size, const char *err)
{
	printf("VMSOCKET-BENCH %s %s size=%zu FAIL err=%s\n", channel, dir,
	       size, err);
	fflush(stdout);
	nfail++;
	return -1;
}

/* guest -> host: 8-byte length, data; reply count + FNV-1a. */
static int bench_g2h(int fd, size_t size, unsigned char *data)
{
	uint64_t per = BENCH_BYTES - BENCH_BYTES % size, total = 0, h = FNV_OFFSET;
	unsigned char hdr[8], reply[16];
	uint64_t done;
	double t0, dt = 0;
	int rounds, r;

	for (done = 0; done < per; done += size)
		h = fnv1a(h, data, size);
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
		/* fnv 0 means the server did not compute it (large requests) */
		if (get_le64(reply) != per)
			return bench_fail("g2h", size, "count-mismatch");
		if (get_le64(reply + 8) && get_le64(reply + 8) != h)
			return bench_fail("g2h", size, "fnv-mismatch");
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
	printf("VMSOCKET-BENCH %s rtt64 count=%d usec=%.1f\n", channel,
	       RTT_COUNT, dt / RTT_COUNT * 1e6);
	fflush(stdout);
	return 0;
fail:
	printf("VMSOCKET-BENCH %s rtt64 FAIL count=%d err=%s\n", channel, i,
	       echo_err(r));
	fflush(stdout);
	nfail++;
	return -1;
}

static int cmd_bench(const char *ch, const char *echo, const char *sink,
		     const char *source)
{
	static const size_t sizes[] = { 4096, 65536, 1048576 };
	int efd, kfd, sfd;
	unsigned char *buf;
	size_t i;

	channel = ch;
	buf = malloc(sizes[2]);
	if (!buf)
		return 1;
	fill_random(buf, sizes[2]);

	efd = open_dev(echo);
	kfd = open_dev(sink);
	sfd = open_dev(source);
	if (efd < 0 || kfd < 0 || sfd < 0)
		return 1;

	for (i = 0; i < ARRAY_SIZE(sizes); i++) {
		if (bench_g2h(kfd, sizes[i], buf))
			break;
	}
	for (i = 0; i < ARRAY_SIZE(sizes); i++) {
		if (bench_h2g(sfd, sizes[i], buf))
			break;
	}
	bench_rtt(efd);

	close(efd);
	close(kfd);
	close(sfd);
	free(buf);
	return nfail ? 1 : 0;
}

static int usage(void)
{
	fprintf(stderr,
		"usage: vmsocket-test selftest DEV\n"
		"       vmsocket-test refused DEV\n"
		"       vmsocket-test signal DEV\n"
		"       vmsocket-test bench CHANNEL ECHO_DEV SINK_DEV SOURCE_DEV\n");
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
	if (argc == 6 && !strcmp(argv[1], "bench"))
		return cmd_bench(argv[2], argv[3], argv[4], argv[5]);
	return usage();
}
