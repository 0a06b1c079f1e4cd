// SPDX-License-Identifier: GPL-2.0
/*
 * vmsocket-stress - hammer /dev/vmsocketN from many threads for the
 * debug-kernel run (KASAN, lockdep, UBSAN; qemupatch/debugkernel.py).
 *
 *   vmsocket-stress run SHARED OWN SECONDS THREADS  (echo servers at both)
 *     Half of the threads share one open file of SHARED and read, write and
 *     poll it at once; the others race to open, use and close OWN (one
 *     wins, the rest get EBUSY). Another
 *     thread sends SIGUSR1 (no SA_RESTART) to random workers, and children
 *     are SIGKILLed in the middle of a read.
 *   vmsocket-stress unbind DEV BDF            (a silent server at DEV's host end)
 *     A read blocks; the device is unbound from the driver under it, then
 *     bound again, and the device is opened again.
 *
 * It prints VMSOCKET-TEST stress-<name> PASS|FAIL key=value... lines; the checkers'
 * own reports are read from the console by the host. Exit status: 0 when
 * all passed, 1 otherwise, 2 on usage errors.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

#define MAX_THREADS	32
#define MAX_IO		70000
#define HANG_SECONDS	30

static const char *dev, *own_dev;
static int shared_fd = -1;
static atomic_int stop;
static atomic_long ops, opens, busy, eintr, eagain, resets, unexpected;
static pthread_t workers[MAX_THREADS];
static int nworkers;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void on_signal(int sig)
{
	(void)sig;
}

/* Count an errno; those a correct driver may give under this load pass. */
static void note_errno(const char *call, int e)
{
	switch (e) {
	case EINTR:
		eintr++;
		break;
	case EAGAIN:
		eagain++;
		break;
	case EBUSY:
		busy++;
		break;
	case ECONNRESET:
	case EPIPE:
	case ENOTCONN:
		resets++;
		break;
	default:
		if (unexpected++ < 10)
			printf("VMSOCKET-STRESS-NOTE unexpected call=%s errno=%d (%s)\n",
			       call, e, strerror(e));
	}
}

/* A few writes, reads and polls on fd; returns when an error ends it. */
static void exercise(int fd, unsigned int *seed)
{
	static char zeros[MAX_IO];
	char buf[MAX_IO];
	int rounds = 1 + rand_r(seed) % 8;
	ssize_t n;

	while (rounds-- && !stop) {
		struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT | POLLRDHUP };
		size_t len = 1 + rand_r(seed) % (rand_r(seed) % 4 ? 512 : MAX_IO);

		switch (rand_r(seed) % 3) {
		case 0:
			n = write(fd, zeros, len);
			break;
		case 1:
			if (poll(&p, 1, rand_r(seed) % 20) < 0) {
				note_errno("poll", errno);
				return;
			}
			n = p.revents & POLLIN ? read(fd, buf, len) : 0;
			break;
		default:
			n = poll(&p, 1, 0) < 0 ? -1 : 0;
			break;
		}
		if (n < 0) {
			note_errno("io", errno);
			if (errno != EINTR && errno != EAGAIN)
				return;
		}
		ops++;
	}
}

static void *worker(void *arg)
{
	unsigned int seed = (unsigned int)(long)arg * 2654435761u;
	int own = (long)arg % 2;

	while (!stop) {
		int fd = shared_fd;

		if (own) {
			fd = open(own_dev, O_RDWR | (rand_r(&seed) % 2 ? O_NONBLOCK : 0));
			if (fd < 0) {
				note_errno("open", errno);
				usleep(1000);
				continue;
			}
			opens++;
		}
		exercise(fd, &seed);
		if (own && close(fd))
			note_errno("close", errno);
	}
	return NULL;
}

static void *signaller(void *arg)
{
	unsigned int seed = 7;

	(void)arg;
	while (!stop) {
		pthread_kill(workers[rand_r(&seed) % nworkers], SIGUSR1);
		usleep(1000 + rand_r(&seed) % 4000);
	}
	return NULL;
}

/* A child blocked in read on the shared file, killed at a random moment. */
static void kill_a_reader(unsigned int *seed)
{
	char buf[4096];
	pid_t pid = fork();

	if (pid == 0) {
		for (;;)
			if (read(shared_fd, buf, sizeof(buf)) < 0 && errno != EINTR)
				_exit(0);
	}
	if (pid < 0)
		return;
	usleep(rand_r(seed) % 20000);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

static int cmd_run(int seconds, int threads)
{
	struct sigaction sa = { .sa_handler = on_signal };
	unsigned int seed = 1;
	pthread_t sig;
	long last = -1;
	double end = now() + seconds, progress = now();
	int i, hung = 0;

	sigaction(SIGUSR1, &sa, NULL);	/* no SA_RESTART: calls see EINTR */
	shared_fd = open(dev, O_RDWR);
	if (shared_fd < 0) {
		printf("VMSOCKET-TEST stress-run FAIL open=%s\n", strerror(errno));
		return 1;
	}
	nworkers = threads;
	for (i = 0; i < threads; i++)
		pthread_create(&workers[i], NULL, worker, (void *)(long)i);
	pthread_create(&sig, NULL, signaller, NULL);
	while (now() < end) {
		kill_a_reader(&seed);
		usleep(200000);
		if (ops + opens != last) {
			last = ops + opens;
			progress = now();
		} else if (now() - progress > HANG_SECONDS) {
			hung = 1;
			break;
		}
	}
	stop = 1;
	if (hung) {
		printf("VMSOCKET-TEST stress-run FAIL hang: no call returned for %d s\n",
		       HANG_SECONDS);
		fflush(stdout);
		return 1;
	}
	/* keep signalling so that blocked workers leave */
	for (i = 0; i < threads; i++) {
		while (pthread_tryjoin_np(workers[i], NULL)) {
			pthread_kill(workers[i], SIGUSR1);
			usleep(10000);
		}
	}
	pthread_join(sig, NULL);
	close(shared_fd);
	printf("VMSOCKET-TEST stress-run %s threads=%d seconds=%d ops=%ld opens=%ld busy=%ld eintr=%ld eagain=%ld resets=%ld unexpected=%ld\n",
	       unexpected || !ops ? "FAIL" : "PASS", threads, seconds, (long)ops,
	       (long)opens, (long)busy, (long)eintr, (long)eagain, (long)resets,
	       (long)unexpected);
	return unexpected || !ops ? 1 : 0;
}

static int write_sysfs(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY), ok;

	if (fd < 0)
		return -errno;
	ok = write(fd, value, strlen(value)) == (ssize_t)strlen(value);
	close(fd);
	return ok ? 0 : -errno;
}

static int cmd_unbind(const char *bdf)
{
	char drv[256], buf[16];
	pid_t pid;
	int fd, st = 0, r, i, done = 0;

	fd = open(dev, O_RDWR);
	if (fd < 0) {
		printf("VMSOCKET-TEST stress-unbind FAIL open=%s\n", strerror(errno));
		return 1;
	}
	pid = fork();
	if (pid == 0)
		_exit(read(fd, buf, sizeof(buf)) < 0 ? 10 + errno % 100 : 0);
	usleep(300000);
	snprintf(drv, sizeof(drv), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
	r = write_sysfs(drv, bdf);
	for (i = 0; i < 100 && !done; i++) {
		done = waitpid(pid, &st, WNOHANG) == pid;
		usleep(100000);
	}
	if (!done) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
	}
	close(fd);
	if (!r)
		r = write_sysfs("/sys/bus/pci/drivers/kvm_vmsocket/bind", bdf);
	usleep(300000);
	fd = open(dev, O_RDWR);
	printf("VMSOCKET-TEST stress-unbind %s unbind_bind=%s reader=%s reopen=%s\n",
	       !r && done && fd >= 0 ? "PASS" : "FAIL", r ? strerror(-r) : "ok",
	       done ? "returned" : "stuck", fd >= 0 ? "ok" : strerror(errno));
	if (fd >= 0)
		close(fd);
	return !r && done && fd >= 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 6 && !strcmp(argv[1], "run")) {
		int threads = atoi(argv[5]);

		dev = argv[2];
		own_dev = argv[3];
		if (threads < 2 || threads > MAX_THREADS)
			threads = 8;
		return cmd_run(atoi(argv[4]), threads);
	}
	if (argc == 4 && !strcmp(argv[1], "unbind")) {
		dev = argv[2];
		return cmd_unbind(argv[3]);
	}
	fprintf(stderr, "usage: vmsocket-stress run SHARED OWN SECONDS THREADS\n"
		"       vmsocket-stress unbind DEV BDF\n");
	return 2;
}
