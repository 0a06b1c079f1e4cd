// SPDX-License-Identifier: GPL-2.0
/*
 * kvm_vmsocket - guest driver for the vmsocket PCI device (1af4:10f0)
 *
 * The device connects the guest to a UNIX socket on the host. Each PCI
 * device becomes one character device, /dev/vmsocket<N>:
 *
 *   open()  = CONNECT, close() = CLOSE (after the output ring drained).
 *
 * Streaming mode (ABI v2, FEATURES.STREAM, module parameter stream=1):
 * BAR1 and BAR2 are rings, their indices live in the control page (BAR3).
 * write() copies into the output ring and returns, read() takes from the
 * input ring; readers and writers have their own locks (full duplex) and
 * sleep only when their ring is empty/full, with interrupts asked for
 * through GUEST_FLAGS just before sleeping.
 *
 * v1 (no FEATURES.STREAM, or stream=0):
 *   write() = copy into the output buffer (BAR2) + WRITECOMMIT, in chunks,
 *   read()  = READ into the input buffer (BAR1) + copy out.
 *
 * The register map and the STATUS/-EINPROGRESS/ISR/CANCEL protocol are
 * described in docs/vmsocket-abi.md, the driver's rules in
 * docs/vmsocket-driver.md. In v1 the device is half-duplex: one action at
 * a time, serialised here by a per-device mutex. The device is not trusted: every
 * STATUS is checked before it reaches user space, every wait is bounded
 * where user space cannot interrupt it, and a device that ignores CANCEL
 * latches the driver into a "broken" state (-EIO) until it is reset.
 */

#include <asm/barrier.h>
#include <linux/bitops.h>
#include <linux/delay.h>
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/kref.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/pm.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#define DRV_NAME		"kvm_vmsocket"

#define VMSOCKET_DEVICE_ID	0x10f0
#define VMSOCKET_ABI_VERSION	1

/* BAR numbers */
#define VMSOCKET_BAR_REGS	0
#define VMSOCKET_BAR_IN		1
#define VMSOCKET_BAR_OUT	2
#define VMSOCKET_BAR_RING	3

/* BAR0 registers */
#define VMSOCKET_STATUS		0x00
#define VMSOCKET_VERSION	0x04
#define VMSOCKET_BUFSIZE	0x08
#define VMSOCKET_ISR		0x0c
#define VMSOCKET_IMR		0x10
#define VMSOCKET_FEATURES	0x14
#define VMSOCKET_MODE		0x18
#define VMSOCKET_CONNECT	0x20
#define VMSOCKET_CLOSE		0x30
#define VMSOCKET_WRITECOMMIT	0x40
#define VMSOCKET_CANCEL		0x50
#define VMSOCKET_READ		0x60
#define VMSOCKET_DOORBELL	0x70
#define VMSOCKET_REGS_SIZE	0x100

#define VMSOCKET_INT_DONE	BIT(0)
#define VMSOCKET_INT_RX		BIT(1)
#define VMSOCKET_INT_TX		BIT(2)
#define VMSOCKET_INT_ALL	(VMSOCKET_INT_DONE | VMSOCKET_INT_RX | VMSOCKET_INT_TX)

/* FEATURES and MODE */
#define VMSOCKET_F_STREAM	BIT(0)
/* DOORBELL */
#define VMSOCKET_DB_TX		BIT(0)
#define VMSOCKET_DB_RX		BIT(1)
/* GUEST_FLAGS */
#define VMSOCKET_WANT_RX	BIT(0)
#define VMSOCKET_WANT_TX	BIT(1)
/* DEV_FLAGS */
#define VMSOCKET_TX_KICK	BIT(0)
#define VMSOCKET_RX_KICK	BIT(1)
#define VMSOCKET_EOF		BIT(2)
#define VMSOCKET_ERROR		BIT(3)

/* BAR3, the ring control page: each field is written by one side only. */
struct vmsocket_ring {
	__le32 tx_prod;			/* guest */
	__le32 rx_cons;			/* guest */
	__le32 guest_flags;		/* guest: VMSOCKET_WANT_* */
	__le32 reserved[13];
	__le32 tx_cons;			/* device */
	__le32 rx_prod;			/* device */
	__le32 dev_flags;		/* device: TX_KICK, RX_KICK, EOF, ERROR */
	__le32 dev_error;		/* device: -errno with ERROR */
};
static_assert(offsetof(struct vmsocket_ring, tx_cons) == 0x40);
static_assert(offsetof(struct vmsocket_ring, dev_error) == 0x4c);
#define VMSOCKET_RING_SIZE	SZ_4K

#define VMSOCKET_BUFSIZE_MIN	SZ_4K
#define VMSOCKET_BUFSIZE_MAX	SZ_64M
/* Largest chunk moved per action. */
#define VMSOCKET_CHUNK_MAX	SZ_4M

/* How long to wait for the device to honour CANCEL. */
#define VMSOCKET_CANCEL_TIMEOUT	(5 * HZ)
/* open() runs under misc_open()'s global mutex: CONNECT gets this long. */
#define VMSOCKET_CONNECT_TIMEOUT (5 * HZ)
/* close(): how long CLOSE, or a queued O_NONBLOCK write, may take. */
#define VMSOCKET_CLOSE_TIMEOUT	(5 * HZ)
/* Re-check STATUS this often even without an interrupt (lost IRQ). */
#define VMSOCKET_POLL_INTERVAL	HZ

/* close() waits this long for the output ring to drain (stream mode). */
#define VMSOCKET_DRAIN_TIMEOUT	(5 * HZ)
/* write() publishes TX_PROD at least every bufsize / this many bytes */
#define VMSOCKET_TX_PUBLISH_DIV	4

static bool stream = true;
module_param(stream, bool, 0644);
MODULE_PARM_DESC(stream,
		 "use the device's streaming mode (ABI v2) when it has it; read at open() (default: true)");

/*
 * Under TCG a round trip through a host peer takes 100-300 us, and an
 * interrupt plus a wakeup of a halted vCPU a good part of it: 1 ms
 * catches such answers (measured: rtt64 median ~110 us against ~275 us
 * with 200 and ~295 us in v1). The window only grows while waits are
 * shorter than this, so a slow or silent peer costs no polling.
 */
static unsigned int rx_poll_us = 1000;
module_param(rx_poll_us, uint, 0644);
MODULE_PARM_DESC(rx_poll_us,
		 "stream mode: longest time read() polls an empty input ring before it sleeps, adapted per device; 0: never (default: 1000)");

/* vmsocket_dev.flags */
#define VMSOCKET_OPEN		0	/* a file is open: others get -EBUSY */

struct vmsocket_dev {
	struct pci_dev *pdev;
	void __iomem *regs;
	/*
	 * BAR1/BAR2 (and BAR3) are RAM of the hypervisor, not device
	 * registers: memremap(MEMREMAP_WB), see vmsocket_map().
	 */
	void *inbuf;
	void *outbuf;
	struct vmsocket_ring *ring;	/* NULL without FEATURES.STREAM */
	u32 bufsize;
	u32 chunk;
	u32 features;
	int id;
	char name[24];
	struct miscdevice misc;
	struct kref kref;		/* probe + each open file */
	wait_queue_head_t wq;		/* DONE interrupt, state changes */
	unsigned long flags;		/* VMSOCKET_OPEN, atomic */
	atomic_t poll_missed;		/* poll() found the lock taken */
	/*
	 * Serialises actions and the state below. Lock order: lock, tx_lock,
	 * rx_lock. In stream mode read() and write() take only their own.
	 */
	struct mutex lock;
	bool busy;			/* connected */
	bool stream;			/* this connection is in stream mode */
	bool gone;			/* remove() or shutdown started */
	bool broken;			/* device ignored CANCEL: -EIO until reset */
	bool conn_reset;		/* connection closed under us (suspend) */
	bool hup;			/* a write found the peer gone */
	/*
	 * Receive state. A READ is always for a whole chunk; what read()
	 * has not taken yet stays in the input buffer (BAR1) at rx_off.
	 * poll() and O_NONBLOCK reads leave a READ pending (rx_pending);
	 * any other action first cancels it (that consumes nothing).
	 */
	bool rx_pending;
	bool rx_eof;
	int rx_err;
	u32 rx_off;
	u32 rx_avail;
	/*
	 * Send state. An O_NONBLOCK write() that the device cannot finish at
	 * once leaves its WRITECOMMIT pending (tx_pending, tx_len bytes) and
	 * returns: the bytes are queued, like in a socket's send buffer.
	 * Until it completes there is no POLLOUT; its error, if any, is
	 * reported by the next write() (tx_err) and by POLLERR.
	 */
	bool tx_pending;
	u32 tx_len;
	int tx_err;

	/*
	 * Stream mode. rx_lock: read() and rx_cons; tx_lock: write() and
	 * tx_prod (our copies of the indices we own). gflags: GUEST_FLAGS,
	 * set by sleepers and cleared by the interrupt handler.
	 */
	struct mutex rx_lock;
	struct mutex tx_lock;
	wait_queue_head_t rx_wq;	/* RX interrupt */
	wait_queue_head_t tx_wq;	/* TX interrupt */
	spinlock_t gflags_lock;
	u32 gflags;
	u32 rx_cons;
	u32 tx_prod;
	u32 rx_spin_ns;			/* adaptive read() poll, see vmsocket_srx_wait() */
};

/* How a caller waits for its action to complete. */
enum vmsocket_wait {
	VMSOCKET_WAIT_UNINTERRUPTIBLE,	/* CLOSE, reset: bounded, then CANCEL */
	VMSOCKET_WAIT_INTERRUPTIBLE,	/* signals cancel the action */
	VMSOCKET_WAIT_NONBLOCK,		/* O_NONBLOCK: do not wait */
};

static DEFINE_IDA(vmsocket_ida);

static void vmsocket_free(struct kref *kref)
{
	struct vmsocket_dev *vd = container_of(kref, struct vmsocket_dev, kref);

	kfree(vd);
}

static s32 vmsocket_status(struct vmsocket_dev *vd)
{
	return (s32)ioread32(vd->regs + VMSOCKET_STATUS);
}

/*
 * STATUS as a result for user space. The device is untrusted: a negative
 * value outside the errno numbers user space knows (1..EHWPOISON), such as
 * the kernel-internal -ERESTARTSYS (-512) and friends or anything below
 * -MAX_ERRNO (which IS_ERR() would not recognise), becomes -EIO.
 */
static s32 vmsocket_result(struct vmsocket_dev *vd)
{
	s32 st = vmsocket_status(vd);

	if (st < 0 && st < -EHWPOISON) {
		dev_err_ratelimited(&vd->pdev->dev, "bad STATUS %d\n", st);
		return -EIO;
	}
	return st;
}

static bool vmsocket_settled(struct vmsocket_dev *vd)
{
	return vmsocket_status(vd) != -EINPROGRESS;
}

static bool vmsocket_wake_cond(struct vmsocket_dev *vd)
{
	return READ_ONCE(vd->gone) || vmsocket_settled(vd);
}

static void vmsocket_wake_all(struct vmsocket_dev *vd)
{
	wake_up_all(&vd->wq);
	wake_up_all(&vd->rx_wq);
	wake_up_all(&vd->tx_wq);
}

/* The device did not honour CANCEL: no more hardware actions until reset. */
static void vmsocket_break(struct vmsocket_dev *vd, const char *why)
{
	if (!vd->broken)
		dev_err(&vd->pdev->dev,
			"%s; device out of step, disabled until reset\n", why);
	WRITE_ONCE(vd->broken, true);
	vmsocket_wake_all(vd);
}

/*
 * Cancel the pending action, if any, and wait (uninterruptibly, bounded)
 * for STATUS to leave -EINPROGRESS. CANCEL with nothing pending is a no-op
 * in the device, so racing the completion is harmless. If the device does
 * not settle, its next STATUS could be any action's: latch broken.
 */
static s32 vmsocket_cancel(struct vmsocket_dev *vd)
{
	iowrite32(1, vd->regs + VMSOCKET_CANCEL);
	if (!wait_event_timeout(vd->wq, vmsocket_settled(vd),
				VMSOCKET_CANCEL_TIMEOUT)) {
		vmsocket_break(vd, "device ignored CANCEL");
		return -EIO;
	}
	return vmsocket_result(vd);
}

/*
 * Start an action. Called with vd->lock held. STATUS must be settled
 * before: the device ignores an action while another is pending, so an
 * action the driver did not start (a raw register user, a kernel before
 * kexec) would otherwise answer for ours. Cancel it first.
 */
static int vmsocket_start(struct vmsocket_dev *vd, unsigned int reg, u32 val)
{
	if (vd->broken)
		return -EIO;
	if (!vmsocket_settled(vd)) {
		dev_warn_ratelimited(&vd->pdev->dev,
				     "an action the driver did not start is pending; cancelling it\n");
		vmsocket_cancel(vd);
		if (vd->broken)
			return -EIO;
	}
	if (reg == VMSOCKET_CONNECT || reg == VMSOCKET_CLOSE)
		iowrite16(val, vd->regs + reg);
	else
		iowrite32(val, vd->regs + reg);
	return 0;
}

/*
 * Wait for the action just started to complete. Called with vd->lock held.
 * Returns the final STATUS (checked). *cancelled is set when a signal,
 * O_NONBLOCK, remove() or @timeout (jiffies, MAX_SCHEDULE_TIMEOUT for none)
 * made us cancel it; STATUS then tells what the action still achieved.
 */
static s32 vmsocket_wait(struct vmsocket_dev *vd, enum vmsocket_wait mode,
			 long timeout, bool *cancelled)
{
	unsigned long end = jiffies + timeout;
	long ret;

	*cancelled = false;
	for (;;) {
		if (vmsocket_settled(vd))
			return vmsocket_result(vd);
		if (READ_ONCE(vd->gone) || mode == VMSOCKET_WAIT_NONBLOCK)
			break;
		if (timeout != MAX_SCHEDULE_TIMEOUT && time_after_eq(jiffies, end))
			break;
		if (mode == VMSOCKET_WAIT_INTERRUPTIBLE)
			ret = wait_event_interruptible_timeout(vd->wq,
							       vmsocket_wake_cond(vd),
							       VMSOCKET_POLL_INTERVAL);
		else
			ret = wait_event_timeout(vd->wq, vmsocket_wake_cond(vd),
						 VMSOCKET_POLL_INTERVAL);
		if (ret < 0)
			break;		/* signal */
	}
	*cancelled = true;
	return vmsocket_cancel(vd);
}

/* Start one action and wait for its result. Called with vd->lock held. */
static s32 vmsocket_action(struct vmsocket_dev *vd, unsigned int reg, u32 val,
			   enum vmsocket_wait mode, long timeout,
			   bool *cancelled)
{
	int ret;

	*cancelled = false;
	ret = vmsocket_start(vd, reg, val);
	if (ret)
		return ret;
	return vmsocket_wait(vd, mode, timeout, cancelled);
}

/*
 * Release vd->lock and wake pollers that may have missed a state change:
 * those whose trylock failed while we held the lock (poll_missed), and,
 * after read()/write() (@changed), every poller, since such a call may
 * have cancelled the READ that poll() started or taken data poll() saw.
 */
static void vmsocket_unlock(struct vmsocket_dev *vd, bool changed)
{
	mutex_unlock(&vd->lock);
	/* atomic_xchg() is fully ordered: it sees a poller's increment */
	if (atomic_xchg(&vd->poll_missed, 0) || changed)
		wake_up(&vd->wq);
}

static bool vmsocket_rx_ready(struct vmsocket_dev *vd)
{
	return vd->rx_avail || vd->rx_eof || vd->rx_err;
}

static void vmsocket_conn_reset(struct vmsocket_dev *vd)
{
	vd->rx_pending = false;
	vd->rx_eof = false;
	vd->rx_err = 0;
	vd->rx_off = 0;
	vd->rx_avail = 0;
	vd->tx_pending = false;
	vd->tx_len = 0;
	vd->tx_err = 0;
	vd->hup = false;
	vd->conn_reset = false;
}

/* Record the result of the READ that was pending. Called with vd->lock. */
static void vmsocket_rx_collect(struct vmsocket_dev *vd, s32 st)
{
	vd->rx_pending = false;
	if (st > 0 && st <= vd->chunk) {
		/*
		 * STATUS (read above) says the device wrote the bytes; BAR1
		 * is mapped cacheable, and its reads must not be done ahead
		 * of the uncached STATUS read: order them.
		 */
		rmb();
		vd->rx_off = 0;
		vd->rx_avail = st;
	} else if (st == 0) {
		vd->rx_eof = true;
	} else if (st > 0) {
		dev_err_ratelimited(&vd->pdev->dev, "READ %u returned %d\n",
				    vd->chunk, st);
		vd->rx_err = -EIO;
	} else if (st != -EINTR) {
		vd->rx_err = st;
	}
}

/* Start a READ of a whole chunk without waiting. Called with vd->lock. */
static void vmsocket_rx_start(struct vmsocket_dev *vd)
{
	if (vmsocket_start(vd, VMSOCKET_READ, vd->chunk))
		return;
	vd->rx_pending = true;
	if (vmsocket_settled(vd))
		vmsocket_rx_collect(vd, vmsocket_result(vd));
}

/* Before another action: end a pending READ, keeping what it received. */
static void vmsocket_rx_settle(struct vmsocket_dev *vd)
{
	if (!vd->rx_pending)
		return;
	if (vmsocket_settled(vd))
		vmsocket_rx_collect(vd, vmsocket_result(vd));
	else
		vmsocket_rx_collect(vd, vmsocket_cancel(vd));
}

/* Record the result of a queued WRITECOMMIT. Called with vd->lock. */
static void vmsocket_tx_collect(struct vmsocket_dev *vd, s32 st)
{
	vd->tx_pending = false;
	if (st == vd->tx_len)
		return;
	if (st >= 0) {
		dev_warn_ratelimited(&vd->pdev->dev,
				     "queued write: %d of %u bytes sent\n",
				     st, vd->tx_len);
		vd->tx_err = -EIO;
	} else {
		vd->tx_err = st;
		if (st == -EPIPE || st == -ECONNRESET)
			vd->hup = true;
	}
}

/*
 * Before another action: let a queued WRITECOMMIT finish. Its bytes were
 * promised to user space, so only close() and suspend cancel it, after
 * VMSOCKET_CLOSE_TIMEOUT. 0, -EAGAIN (O_NONBLOCK), -ERESTARTSYS or -EIO.
 */
static int vmsocket_tx_settle(struct vmsocket_dev *vd, enum vmsocket_wait mode)
{
	long ret;

	if (!vd->tx_pending)
		return 0;
	if (vd->broken)
		return -EIO;
	switch (mode) {
	case VMSOCKET_WAIT_NONBLOCK:
		if (!vmsocket_settled(vd))
			return -EAGAIN;
		break;
	case VMSOCKET_WAIT_INTERRUPTIBLE:
		/* re-check once a second, in case an interrupt is lost */
		do {
			ret = wait_event_interruptible_timeout(vd->wq,
							       vmsocket_wake_cond(vd),
							       VMSOCKET_POLL_INTERVAL);
			if (ret < 0)
				return -ERESTARTSYS;
		} while (!vmsocket_wake_cond(vd));
		if (READ_ONCE(vd->gone))
			return -ENODEV;
		break;
	case VMSOCKET_WAIT_UNINTERRUPTIBLE:
		if (!wait_event_timeout(vd->wq, vmsocket_wake_cond(vd),
					VMSOCKET_CLOSE_TIMEOUT)) {
			s32 st = vmsocket_cancel(vd);

			dev_warn_ratelimited(&vd->pdev->dev,
					     "queued write cancelled: %d of %u bytes sent\n",
					     st, vd->tx_len);
			vd->tx_pending = false;
			return vd->broken ? -EIO : 0;
		}
		break;
	}
	vmsocket_tx_collect(vd, vmsocket_result(vd));
	return 0;
}

/* -EIO, -ENODEV or -ECONNRESET when the file cannot be used any more. */
static int vmsocket_usable(struct vmsocket_dev *vd)
{
	if (READ_ONCE(vd->gone))
		return -ENODEV;
	if (READ_ONCE(vd->broken))
		return -EIO;
	if (READ_ONCE(vd->conn_reset))
		return -ECONNRESET;
	return 0;
}

/* ---- stream mode (ABI v2) ---------------------------------------------- */

static u32 vmsocket_ld(__le32 *p)
{
	return le32_to_cpu(READ_ONCE(*p));
}

/*
 * GUEST_FLAGS: sleepers set WANT_RX/WANT_TX (then re-check), the interrupt
 * handler clears the bit it got an interrupt for (one interrupt per arming:
 * a reader or writer that never sleeps never gets one).
 */
static void vmsocket_gflags(struct vmsocket_dev *vd, u32 set, u32 clear)
{
	unsigned long irqflags;
	u32 val;

	spin_lock_irqsave(&vd->gflags_lock, irqflags);
	val = (vd->gflags | set) & ~clear;
	if (val != vd->gflags) {
		vd->gflags = val;
		WRITE_ONCE(vd->ring->guest_flags, cpu_to_le32(val));
	}
	spin_unlock_irqrestore(&vd->gflags_lock, irqflags);
}

/* A connection's fresh control page (the device zeroed it at CONNECT). */
static void vmsocket_stream_reset(struct vmsocket_dev *vd)
{
	unsigned long irqflags;

	spin_lock_irqsave(&vd->gflags_lock, irqflags);
	vd->gflags = 0;
	spin_unlock_irqrestore(&vd->gflags_lock, irqflags);
	vd->rx_cons = 0;
	vd->tx_prod = 0;
	vd->rx_spin_ns = 0;
}

/* DEV_ERROR as an errno for user space (untrusted, like STATUS). */
static int vmsocket_dev_error(struct vmsocket_dev *vd)
{
	s32 err = (s32)vmsocket_ld(&vd->ring->dev_error);

	if (err < 0 && err >= -EHWPOISON)
		return err;
	dev_err_ratelimited(&vd->pdev->dev, "bad DEV_ERROR %d\n", err);
	return -EIO;
}

/* The device moved an index out of range: it cannot be trusted any more. */
static int vmsocket_ring_corrupt(struct vmsocket_dev *vd, const char *what,
				 u32 dist)
{
	dev_err_ratelimited(&vd->pdev->dev, "%s is %u bytes off, ring is %u\n",
			    what, dist, vd->bufsize);
	vmsocket_break(vd, "ring index out of range");
	return -EIO;
}

/* Whether read() would not block: data, EOF or ERROR. Lockless. */
static bool vmsocket_srx_ready(struct vmsocket_dev *vd)
{
	return vmsocket_ld(&vd->ring->rx_prod) != READ_ONCE(vd->rx_cons) ||
	       (vmsocket_ld(&vd->ring->dev_flags) & (VMSOCKET_EOF | VMSOCKET_ERROR));
}

/* Free bytes in the output ring, as far as the caller can tell. */
static u32 vmsocket_stx_space(struct vmsocket_dev *vd)
{
	u32 used = READ_ONCE(vd->tx_prod) - vmsocket_ld(&vd->ring->tx_cons);

	return used > vd->bufsize ? 0 : vd->bufsize - used;
}

static bool vmsocket_stream_dead(struct vmsocket_dev *vd)
{
	return READ_ONCE(vd->gone) || READ_ONCE(vd->broken) ||
	       READ_ONCE(vd->conn_reset);
}

/*
 * Wait conditions that arm the interrupt: set WANT_*, full barrier (pairs
 * with the device's "store the index, smp_mb, read the flag"), re-check.
 * wait_event*() evaluates them after queueing the task, so an interrupt
 * that clears the flag after the check still wakes it, and the next
 * evaluation arms again.
 */
static bool vmsocket_srx_arm(struct vmsocket_dev *vd)
{
	if (vmsocket_srx_ready(vd) || vmsocket_stream_dead(vd))
		return true;
	vmsocket_gflags(vd, VMSOCKET_WANT_RX, 0);
	/* WANT_RX before RX_PROD/DEV_FLAGS: pairs with the device's smp_mb */
	virt_mb();
	return vmsocket_srx_ready(vd);
}

static bool vmsocket_stx_arm(struct vmsocket_dev *vd, u32 want)
{
	if (vmsocket_stx_space(vd) >= want || vmsocket_stream_dead(vd) ||
	    (vmsocket_ld(&vd->ring->dev_flags) & VMSOCKET_ERROR))
		return true;
	vmsocket_gflags(vd, VMSOCKET_WANT_TX, 0);
	/* WANT_TX before TX_CONS/DEV_FLAGS: pairs with the device's smp_mb */
	virt_mb();
	return vmsocket_stx_space(vd) >= want ||
	       (vmsocket_ld(&vd->ring->dev_flags) & VMSOCKET_ERROR);
}

/* close(): everything written went to the socket, or it never will. */
static bool vmsocket_stx_drained_arm(struct vmsocket_dev *vd)
{
	return vmsocket_stx_arm(vd, vd->bufsize);
}

/*
 * Let close() not lose what write() already returned for: wait (bounded)
 * until the device took the output ring. Called with all locks held.
 */
static void vmsocket_stream_drain(struct vmsocket_dev *vd)
{
	u32 left;

	if (wait_event_timeout(vd->tx_wq, vmsocket_stx_drained_arm(vd),
			       VMSOCKET_DRAIN_TIMEOUT))
		return;
	left = vd->bufsize - vmsocket_stx_space(vd);
	dev_warn_ratelimited(&vd->pdev->dev,
			     "close: %u written bytes not taken by the peer in time, dropped\n",
			     left);
}

/*
 * Bytes in the input ring (> 0), 0 at end of file, -EAGAIN when empty,
 * or an error. EOF and ERROR are only believed once no byte precedes
 * them: read DEV_FLAGS before RX_PROD (the device sets them after its last
 * RX_PROD store).
 */
static int vmsocket_srx_avail(struct vmsocket_dev *vd, u32 *avail)
{
	u32 flags = vmsocket_ld(&vd->ring->dev_flags);
	u32 n;

	/* DEV_FLAGS before RX_PROD: EOF/ERROR come after the last byte */
	virt_rmb();
	n = vmsocket_ld(&vd->ring->rx_prod) - vd->rx_cons;
	if (n > vd->bufsize)
		return vmsocket_ring_corrupt(vd, "RX_PROD", n);
	*avail = n;
	if (n) {
		/* the index before the bytes it covers */
		virt_rmb();
		return 1;
	}
	if (flags & VMSOCKET_ERROR)
		return vmsocket_dev_error(vd);
	return flags & VMSOCKET_EOF ? 0 : -EAGAIN;
}

/* Copy up to @count of @avail bytes out of the input ring; bytes or -EFAULT. */
static ssize_t vmsocket_srx_copy(struct vmsocket_dev *vd, char __user *buf,
				 size_t count, u32 avail)
{
	u32 mask = vd->bufsize - 1, off = vd->rx_cons & mask;
	size_t n = min_t(size_t, count, avail);
	size_t first = min_t(size_t, n, vd->bufsize - off);
	size_t left;

	left = copy_to_user(buf, vd->inbuf + off, first);
	if (!left && n > first)
		left = copy_to_user(buf + first, vd->inbuf, n - first);
	else if (left)
		left += n - first;
	n -= left;
	if (!n)
		return -EFAULT;
	WRITE_ONCE(vd->rx_cons, vd->rx_cons + n);
	/* the bytes are read before the device may reuse their space */
	virt_store_release(&vd->ring->rx_cons, cpu_to_le32(vd->rx_cons));
	/* the device sets RX_KICK, smp_mb, re-checks RX_CONS: Dekker */
	virt_mb();
	if (vmsocket_ld(&vd->ring->dev_flags) & VMSOCKET_RX_KICK)
		iowrite32(VMSOCKET_DB_RX, vd->regs + VMSOCKET_DOORBELL);
	return n;
}

/*
 * Wait for the input ring. Ask the device to look at the socket, poll
 * the ring for up to rx_spin_ns (small messages and round trips come back
 * faster than an interrupt and a wakeup), then arm WANT_RX and sleep. rx_spin_ns adapts like KVM's halt
 * polling: a wait that a longer poll would have caught doubles it (up to
 * rx_poll_us), a longer wait halves it. 0 or -ERESTARTSYS. Under rx_lock.
 */
static int vmsocket_srx_wait(struct vmsocket_dev *vd)
{
	u32 max_ns = min(READ_ONCE(rx_poll_us), 10000U) * NSEC_PER_USEC;
	u32 spin = min(vd->rx_spin_ns, max_ns);
	u64 start = ktime_get_ns(), waited;
	long ret;

	/*
	 * The answer may be in the socket already: DOORBELL.RX makes the
	 * device read it now, in this vCPU's MMIO write (as v1's READ does),
	 * instead of when its main loop gets round to it. A doorbell with
	 * room in the ring is harmless (ABI v2).
	 */
	iowrite32(VMSOCKET_DB_RX, vd->regs + VMSOCKET_DOORBELL);
	if (vmsocket_srx_ready(vd))
		return 0;
	if (spin) {
		do {
			if (vmsocket_srx_ready(vd) || vmsocket_stream_dead(vd))
				return 0;	/* caught: keep the window */
			if (need_resched() || signal_pending(current))
				break;
			cpu_relax();
		} while (ktime_get_ns() - start < spin);
	}
	do {
		ret = wait_event_interruptible_timeout(vd->rx_wq,
						       vmsocket_srx_arm(vd),
						       VMSOCKET_POLL_INTERVAL);
		if (ret < 0)
			return -ERESTARTSYS;
	} while (!ret);
	waited = ktime_get_ns() - start;
	if (!max_ns)
		vd->rx_spin_ns = 0;
	else if (waited <= max_ns)
		vd->rx_spin_ns = clamp_t(u32, spin * 2, 10 * NSEC_PER_USEC, max_ns);
	else
		vd->rx_spin_ns = spin / 2;
	return 0;
}

static ssize_t vmsocket_sread(struct vmsocket_dev *vd, struct file *file,
			      char __user *buf, size_t count)
{
	ssize_t ret;
	u32 avail;

	if (file->f_flags & O_NONBLOCK) {
		if (!mutex_trylock(&vd->rx_lock))
			return -EAGAIN;
	} else if (mutex_lock_interruptible(&vd->rx_lock)) {
		return -ERESTARTSYS;
	}
	for (;;) {
		ret = vmsocket_usable(vd);
		if (ret)
			break;
		ret = vmsocket_srx_avail(vd, &avail);
		if (ret > 0) {
			ret = vmsocket_srx_copy(vd, buf, count, avail);
			break;
		}
		if (ret != -EAGAIN || (file->f_flags & O_NONBLOCK))
			break;
		ret = vmsocket_srx_wait(vd);
		if (ret)
			break;
	}
	mutex_unlock(&vd->rx_lock);
	return ret;
}

/* Copy @n bytes into the output ring and publish them; bytes or -EFAULT. */
static ssize_t vmsocket_stx_copy(struct vmsocket_dev *vd,
				 const char __user *buf, size_t n)
{
	u32 mask = vd->bufsize - 1, off = vd->tx_prod & mask;
	size_t first = min_t(size_t, n, vd->bufsize - off);
	size_t left;

	left = copy_from_user(vd->outbuf + off, buf, first);
	if (!left && n > first)
		left = copy_from_user(vd->outbuf, buf + first, n - first);
	else if (left)
		left += n - first;
	n -= left;
	if (!n)
		return -EFAULT;
	WRITE_ONCE(vd->tx_prod, vd->tx_prod + n);
	/* bytes before the index that covers them */
	virt_store_release(&vd->ring->tx_prod, cpu_to_le32(vd->tx_prod));
	/* the device sets TX_KICK, smp_mb, re-checks TX_PROD: Dekker */
	virt_mb();
	if (vmsocket_ld(&vd->ring->dev_flags) & VMSOCKET_TX_KICK)
		iowrite32(VMSOCKET_DB_TX, vd->regs + VMSOCKET_DOORBELL);
	return n;
}

/*
 * write(): into the output ring, then return; the device sends in the
 * background. Waits only for ring space (a blocking write sends all of
 * @count, like a socket; a signal returns what was queued).
 */
static ssize_t vmsocket_swrite(struct vmsocket_dev *vd, struct file *file,
			       const char __user *buf, size_t count)
{
	bool nonblock = file->f_flags & O_NONBLOCK;
	u32 publish = max_t(u32, vd->bufsize / VMSOCKET_TX_PUBLISH_DIV,
			    VMSOCKET_BUFSIZE_MIN);
	size_t done = 0;
	ssize_t ret = 0;
	u32 space, used, batch, cons;
	long w;

	if (nonblock) {
		if (!mutex_trylock(&vd->tx_lock))
			return -EAGAIN;
	} else if (mutex_lock_interruptible(&vd->tx_lock)) {
		return -ERESTARTSYS;
	}
	while (done < count) {
		ret = vmsocket_usable(vd);
		if (ret)
			break;
		if (vmsocket_ld(&vd->ring->dev_flags) & VMSOCKET_ERROR) {
			ret = vmsocket_dev_error(vd);
			if (ret == -EPIPE || ret == -ECONNRESET)
				WRITE_ONCE(vd->hup, true);
			break;
		}
		/* the device read the bytes before TX_CONS freed their space */
		cons = le32_to_cpu(virt_load_acquire(&vd->ring->tx_cons));
		used = vd->tx_prod - cons;
		if (used > vd->bufsize) {
			ret = vmsocket_ring_corrupt(vd, "TX_CONS", used);
			break;
		}
		space = vd->bufsize - used;
		if (space) {
			ret = vmsocket_stx_copy(vd, buf + done,
						min3(count - done, (size_t)space,
						     (size_t)publish));
			if (ret < 0)
				break;
			done += ret;
			continue;
		}
		if (nonblock) {
			ret = -EAGAIN;
			break;
		}
		if (done && signal_pending(current))
			break;
		/* wake for a batch (up to a quarter ring), not for every byte */
		batch = min_t(size_t, count - done, publish);
		w = wait_event_interruptible_timeout(vd->tx_wq,
						     vmsocket_stx_arm(vd, batch),
						     VMSOCKET_POLL_INTERVAL);
		if (w < 0) {
			ret = -ERESTARTSYS;
			break;
		}
	}
	mutex_unlock(&vd->tx_lock);
	/* Bytes already queued win over the error that stopped us. */
	return done ? done : ret;
}

/*
 * Stream poll(): the rings say it all; no action is started. POLLOUT once
 * a quarter of the output ring is free (a writer woken for a few bytes
 * would only spin), POLLIN on data, EOF or ERROR, POLLRDHUP at EOF,
 * POLLHUP|POLLERR on ERROR. Under vd->lock so that the control page stays
 * mapped and connected while we look (remove(), suspend take it).
 */
static __poll_t vmsocket_spoll(struct vmsocket_dev *vd, __poll_t want)
{
	u32 thresh = vd->bufsize / VMSOCKET_TX_PUBLISH_DIV;
	__poll_t mask = 0;
	u32 flags;

	mutex_lock(&vd->lock);
	if (vd->gone) {
		mask = EPOLLERR | EPOLLHUP;
		goto out;
	}
	if (vd->broken) {
		mask = EPOLLERR;
		goto out;
	}
	if (vd->conn_reset || !vd->busy) {
		mask = EPOLLERR | EPOLLHUP;
		goto out;
	}
	if ((want & (EPOLLIN | EPOLLRDNORM | EPOLLRDHUP)) &&
	    !vmsocket_srx_ready(vd)) {
		/* as read(): have the device look at the socket now */
		iowrite32(VMSOCKET_DB_RX, vd->regs + VMSOCKET_DOORBELL);
		vmsocket_srx_arm(vd);
	}
	if (want & (EPOLLOUT | EPOLLWRNORM))
		vmsocket_stx_arm(vd, thresh);

	flags = vmsocket_ld(&vd->ring->dev_flags);
	/* DEV_FLAGS before RX_PROD, as in vmsocket_srx_avail() */
	virt_rmb();
	if (vmsocket_ld(&vd->ring->rx_prod) != READ_ONCE(vd->rx_cons))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (flags & VMSOCKET_EOF)
		mask |= EPOLLIN | EPOLLRDNORM | EPOLLRDHUP;
	if (flags & VMSOCKET_ERROR)
		mask |= EPOLLIN | EPOLLRDNORM | EPOLLOUT | EPOLLWRNORM |
			EPOLLERR | EPOLLHUP;
	else if (vmsocket_stx_space(vd) >= thresh)
		mask |= EPOLLOUT | EPOLLWRNORM;
out:
	mutex_unlock(&vd->lock);
	return mask;
}

/* Take every lock: no stream reader or writer touches the rings after. */
static void vmsocket_lock_all(struct vmsocket_dev *vd)
{
	mutex_lock(&vd->lock);
	mutex_lock(&vd->tx_lock);
	mutex_lock(&vd->rx_lock);
}

static void vmsocket_unlock_all(struct vmsocket_dev *vd)
{
	mutex_unlock(&vd->rx_lock);
	mutex_unlock(&vd->tx_lock);
	mutex_unlock(&vd->lock);
}

/*
 * open(): stream mode if the device has it and the parameter wants it.
 * MODE is only taken while the device is idle; read it back to know.
 * Called with vd->lock held, before CONNECT.
 */
static int vmsocket_negotiate(struct vmsocket_dev *vd)
{
	u32 want = 0, mode;

	if (!vd->ring)
		return 0;		/* an older device: MODE does not exist */
	if (READ_ONCE(stream) && (vd->features & VMSOCKET_F_STREAM))
		want = VMSOCKET_F_STREAM;
	iowrite32(want, vd->regs + VMSOCKET_MODE);
	mode = ioread32(vd->regs + VMSOCKET_MODE) & VMSOCKET_F_STREAM;
	vd->stream = mode;
	return 0;
}

static int vmsocket_open(struct inode *inode, struct file *file)
{
	struct miscdevice *misc = file->private_data;
	struct vmsocket_dev *vd = container_of(misc, struct vmsocket_dev, misc);
	bool cancelled;
	s32 st;
	int ret;

	/*
	 * misc_open() holds the global misc_mtx while we run: never sleep
	 * on vd->lock for another file (a reader may hold it as long as its
	 * peer is silent). One open file at a time, decided atomically; the
	 * lock is then free but for remove()/PM, which hold it briefly.
	 */
	if (test_and_set_bit(VMSOCKET_OPEN, &vd->flags))
		return -EBUSY;
	/* misc_open() holds misc_mtx, so remove() cannot free vd under us. */
	kref_get(&vd->kref);
	file->private_data = vd;

	ret = mutex_lock_interruptible(&vd->lock);
	if (ret)
		goto put;
	ret = vd->gone ? -ENODEV : vd->broken ? -EIO : 0;
	if (ret)
		goto unlock;

	vmsocket_negotiate(vd);
	if (vd->stream)
		vmsocket_stream_reset(vd);
	/* Bounded: a device that never completes CONNECT must not hold misc_mtx. */
	st = vmsocket_action(vd, VMSOCKET_CONNECT, 1, VMSOCKET_WAIT_INTERRUPTIBLE,
			     VMSOCKET_CONNECT_TIMEOUT, &cancelled);
	if (st) {
		if (st > 0)
			ret = -EIO;
		else if (vd->gone)
			ret = -ENODEV;
		else if (cancelled && st == -EINTR)
			ret = signal_pending(current) ? -ERESTARTSYS : -ETIMEDOUT;
		else
			ret = st;
		vd->stream = false;
		goto unlock;
	}
	vd->busy = true;
	vmsocket_conn_reset(vd);
	mutex_unlock(&vd->lock);
	return stream_open(inode, file);

unlock:
	mutex_unlock(&vd->lock);
put:
	clear_bit(VMSOCKET_OPEN, &vd->flags);
	kref_put(&vd->kref, vmsocket_free);
	return ret;
}

/*
 * Close the connection, bounded. Called with vd->lock held and the
 * hardware mapped (also from remove(), where vd->gone is already set).
 */
static void vmsocket_disconnect(struct vmsocket_dev *vd)
{
	bool cancelled;
	s32 st;

	if (!vd->busy || vd->broken)
		goto out;
	if (vd->stream && !vd->gone && !vd->conn_reset)
		vmsocket_stream_drain(vd);
	vmsocket_tx_settle(vd, VMSOCKET_WAIT_UNINTERRUPTIBLE);
	if (!vd->broken)
		vmsocket_rx_settle(vd);
	st = vmsocket_action(vd, VMSOCKET_CLOSE, 1,
			     VMSOCKET_WAIT_UNINTERRUPTIBLE,
			     VMSOCKET_CLOSE_TIMEOUT, &cancelled);
	if (cancelled && !vd->broken)
		vmsocket_break(vd, "CLOSE did not complete");
	else if (st < 0 && st != -ENOTCONN)
		dev_dbg(&vd->pdev->dev, "CLOSE: %d\n", st);
	/* Back to v1 for whoever uses the device next (an older kernel). */
	if (vd->ring && !vd->broken)
		iowrite32(0, vd->regs + VMSOCKET_MODE);
out:
	vd->busy = false;
}

static int vmsocket_release(struct inode *inode, struct file *file)
{
	struct vmsocket_dev *vd = file->private_data;

	vmsocket_lock_all(vd);
	if (!vd->conn_reset && !vd->gone)
		vmsocket_disconnect(vd);
	vd->busy = false;
	vd->stream = false;
	vmsocket_conn_reset(vd);
	mutex_unlock(&vd->rx_lock);
	mutex_unlock(&vd->tx_lock);
	vmsocket_unlock(vd, true);
	clear_bit(VMSOCKET_OPEN, &vd->flags);
	kref_put(&vd->kref, vmsocket_free);
	return 0;
}

/*
 * Take the device for one read() or write(). O_NONBLOCK callers do not
 * wait for another caller's action, nor for their own.
 */
static int vmsocket_lock(struct vmsocket_dev *vd, struct file *file,
			 enum vmsocket_wait *mode)
{
	int ret;

	if (file->f_flags & O_NONBLOCK) {
		*mode = VMSOCKET_WAIT_NONBLOCK;
		if (!mutex_trylock(&vd->lock))
			return -EAGAIN;
	} else {
		*mode = VMSOCKET_WAIT_INTERRUPTIBLE;
		if (mutex_lock_interruptible(&vd->lock))
			return -ERESTARTSYS;
	}
	ret = vmsocket_usable(vd);
	if (ret)
		mutex_unlock(&vd->lock);
	return ret;
}

/* The errno for an action that was cancelled before it moved any byte. */
static int vmsocket_cancelled_err(enum vmsocket_wait mode)
{
	return mode == VMSOCKET_WAIT_NONBLOCK ? -EAGAIN : -ERESTARTSYS;
}

/*
 * BAR <-> user copies (v1). The buffers are mapped as memory (see
 * vmsocket_map()), so user space is copied straight from and to them: one
 * copy per byte.
 */
static int vmsocket_copy_to_bar(struct vmsocket_dev *vd, const char __user *buf,
				size_t len)
{
	return copy_from_user(vd->outbuf, buf, len) ? -EFAULT : 0;
}

static int vmsocket_copy_from_bar(struct vmsocket_dev *vd, char __user *buf,
				  u32 from, size_t len)
{
	return copy_to_user(buf, vd->inbuf + from, len) ? -EFAULT : 0;
}

static ssize_t vmsocket_read(struct file *file, char __user *buf, size_t count,
			     loff_t *ppos)
{
	struct vmsocket_dev *vd = file->private_data;
	enum vmsocket_wait mode;
	bool cancelled;
	ssize_t ret;
	size_t len;
	s32 st;

	if (!count)
		return 0;
	if (READ_ONCE(vd->stream))
		return vmsocket_sread(vd, file, buf, count);
	ret = vmsocket_lock(vd, file, &mode);
	if (ret)
		return ret;
	ret = vmsocket_tx_settle(vd, mode);
	if (ret)
		goto out;

	/* A READ left by poll() or an O_NONBLOCK read() may be done by now. */
	if (vd->rx_pending && vmsocket_settled(vd))
		vmsocket_rx_collect(vd, vmsocket_result(vd));
	if (!vmsocket_rx_ready(vd)) {
		if (!vd->rx_pending)
			vmsocket_rx_start(vd);
		if (vd->rx_pending) {
			if (mode == VMSOCKET_WAIT_NONBLOCK) {
				/* leave the READ pending for poll() */
				ret = -EAGAIN;
				goto out;
			}
			st = vmsocket_wait(vd, mode, MAX_SCHEDULE_TIMEOUT,
					   &cancelled);
			vmsocket_rx_collect(vd, st);
			if (vd->gone) {
				ret = -ENODEV;
				goto out;
			}
			/* A READ cancelled after data arrived keeps that data. */
			if (!vmsocket_rx_ready(vd)) {
				ret = vd->broken ? -EIO :
				      cancelled && st == -EINTR ? -ERESTARTSYS : -EIO;
				goto out;
			}
		} else if (vd->broken) {
			ret = -EIO;
			goto out;
		}
	}

	if (vd->rx_avail) {
		len = min_t(size_t, count, vd->rx_avail);
		if (vmsocket_copy_from_bar(vd, buf, vd->rx_off, len)) {
			ret = -EFAULT;
			goto out;
		}
		vd->rx_off += len;
		vd->rx_avail -= len;
		ret = len;
	} else if (vd->rx_eof) {
		vd->rx_eof = false;
		ret = 0;
	} else {
		ret = vd->rx_err;
		vd->rx_err = 0;
	}
out:
	vmsocket_unlock(vd, true);
	return ret;
}

static ssize_t vmsocket_write(struct file *file, const char __user *buf,
			      size_t count, loff_t *ppos)
{
	struct vmsocket_dev *vd = file->private_data;
	enum vmsocket_wait mode;
	size_t done = 0;
	bool cancelled;
	ssize_t ret;
	size_t len;
	s32 st;

	if (!count)
		return 0;
	if (READ_ONCE(vd->stream))
		return vmsocket_swrite(vd, file, buf, count);
	ret = vmsocket_lock(vd, file, &mode);
	if (ret)
		return ret;
	ret = vmsocket_tx_settle(vd, mode);
	if (ret)
		goto out;
	if (vd->tx_err) {
		/* a queued write failed: report it once, like SO_ERROR */
		ret = vd->tx_err;
		vd->tx_err = 0;
		goto out;
	}
	vmsocket_rx_settle(vd);

	while (done < count) {
		if (vd->gone) {
			ret = -ENODEV;
			break;
		}
		if (vd->broken) {
			ret = -EIO;
			break;
		}
		if (done && signal_pending(current))
			break;

		len = min_t(size_t, count - done, vd->chunk);
		if (vmsocket_copy_to_bar(vd, buf + done, len)) {
			ret = -EFAULT;
			break;
		}
		/* Make the buffer contents visible before the doorbell. */
		wmb();

		ret = vmsocket_start(vd, VMSOCKET_WRITECOMMIT, len);
		if (ret)
			break;
		if (mode == VMSOCKET_WAIT_NONBLOCK && !vmsocket_settled(vd)) {
			/* Queue it: no POLLOUT until the device took it. */
			vd->tx_pending = true;
			vd->tx_len = len;
			done += len;
			break;
		}
		st = vmsocket_wait(vd, mode, MAX_SCHEDULE_TIMEOUT, &cancelled);
		if (st > (s32)len || (st == 0 && !cancelled)) {
			dev_err_ratelimited(&vd->pdev->dev,
					    "WRITECOMMIT %zu returned %d\n",
					    len, st);
			ret = -EIO;
			break;
		}
		if (st <= 0) {
			if (vd->gone)
				ret = -ENODEV;
			else if (vd->broken)
				ret = -EIO;
			else if (cancelled && (st == -EINTR || st == 0))
				ret = vmsocket_cancelled_err(mode);
			else
				ret = st;
			if (st == -EPIPE || st == -ECONNRESET)
				vd->hup = true;
			break;
		}
		done += st;
		if (cancelled || (size_t)st < len)
			break;
	}
out:
	vmsocket_unlock(vd, true);

	/* Bytes already sent win over the error that stopped us. */
	return done ? done : ret;
}

/*
 * Readable: data, end of file or an error waits for read(). To find out,
 * poll() starts a READ (only if the caller asked for input) and leaves it
 * pending; the DONE interrupt wakes the poller. Writable: no queued
 * O_NONBLOCK write is still pending. POLLRDHUP at end of file, POLLHUP
 * once a write found the peer gone (or the connection was reset), POLLERR
 * for a failed queued write, a broken or removed device.
 */
static __poll_t vmsocket_poll(struct file *file, poll_table *wait)
{
	struct vmsocket_dev *vd = file->private_data;
	__poll_t want = poll_requested_events(wait);
	__poll_t mask = 0;

	poll_wait(file, &vd->wq, wait);
	if (READ_ONCE(vd->stream)) {
		poll_wait(file, &vd->rx_wq, wait);
		poll_wait(file, &vd->tx_wq, wait);
		return vmsocket_spoll(vd, want);
	}
	if (READ_ONCE(vd->gone))
		return EPOLLERR | EPOLLHUP;
	if (READ_ONCE(vd->broken)) {
		mask |= EPOLLERR;
		return mask;
	}
	/*
	 * Another caller holds the device. Say so before trying, so that
	 * its vmsocket_unlock() wakes us: nothing is lost either way.
	 */
	atomic_inc(&vd->poll_missed);
	/* order the increment before the trylock; pairs with atomic_xchg() */
	smp_mb__after_atomic();
	if (!mutex_trylock(&vd->lock))
		return 0;
	atomic_dec_if_positive(&vd->poll_missed);

	if (vd->conn_reset) {
		mask = EPOLLERR | EPOLLHUP;
		goto out;
	}
	if (vd->tx_pending)
		vmsocket_tx_settle(vd, VMSOCKET_WAIT_NONBLOCK);
	if (vd->rx_pending && vmsocket_settled(vd))
		vmsocket_rx_collect(vd, vmsocket_result(vd));
	if ((want & (EPOLLIN | EPOLLRDNORM | EPOLLRDHUP)) &&
	    !vmsocket_rx_ready(vd) && !vd->rx_pending && !vd->tx_pending &&
	    !vd->hup)
		vmsocket_rx_start(vd);

	if (!vd->tx_pending)
		mask |= EPOLLOUT | EPOLLWRNORM;
	if (vd->rx_avail || vd->rx_err)
		mask |= EPOLLIN | EPOLLRDNORM;
	if (vd->rx_eof)
		mask |= EPOLLIN | EPOLLRDNORM | EPOLLRDHUP;
	if (vd->hup)
		mask |= EPOLLHUP;
	if (vd->tx_err || vd->broken)
		mask |= EPOLLERR;
out:
	vmsocket_unlock(vd, false);
	return mask;
}

static const struct file_operations vmsocket_fops = {
	.owner		= THIS_MODULE,
	.open		= vmsocket_open,
	.release	= vmsocket_release,
	.read		= vmsocket_read,
	.write		= vmsocket_write,
	.poll		= vmsocket_poll,
};

static irqreturn_t vmsocket_irq(int irq, void *data)
{
	struct vmsocket_dev *vd = data;
	u32 isr;

	isr = ioread32(vd->regs + VMSOCKET_ISR);
	if (isr == ~0U || !(isr & VMSOCKET_INT_ALL))
		return IRQ_NONE;	/* shared INTx, or device gone */
	isr &= VMSOCKET_INT_ALL;
	iowrite32(isr, vd->regs + VMSOCKET_ISR);
	if (isr & VMSOCKET_INT_RX) {
		if (vd->ring)
			vmsocket_gflags(vd, 0, VMSOCKET_WANT_RX);
		wake_up(&vd->rx_wq);
	}
	if (isr & VMSOCKET_INT_TX) {
		if (vd->ring)
			vmsocket_gflags(vd, 0, VMSOCKET_WANT_TX);
		wake_up(&vd->tx_wq);
	}
	if (isr & VMSOCKET_INT_DONE)
		wake_up(&vd->wq);
	return IRQ_HANDLED;
}

/*
 * Bring the device to a known state without interrupts: cancel whatever is
 * pending (an earlier kernel's, before kexec, or anyone's), close the
 * connection, acknowledge ISR. Polls STATUS, bounded. 0 or -EIO.
 */
static int vmsocket_hw_reset(struct vmsocket_dev *vd)
{
	unsigned long end;

	end = jiffies + VMSOCKET_CANCEL_TIMEOUT;
	iowrite32(1, vd->regs + VMSOCKET_CANCEL);
	while (!vmsocket_settled(vd)) {
		if (time_after(jiffies, end))
			return -EIO;
		usleep_range(1000, 2000);
	}
	end = jiffies + VMSOCKET_CLOSE_TIMEOUT;
	iowrite16(1, vd->regs + VMSOCKET_CLOSE);
	while (!vmsocket_settled(vd)) {
		if (time_after(jiffies, end))
			return -EIO;
		usleep_range(1000, 2000);
	}
	if (vd->ring)
		iowrite32(0, vd->regs + VMSOCKET_MODE);	/* v1 for the next user */
	iowrite32(VMSOCKET_INT_ALL, vd->regs + VMSOCKET_ISR);
	return 0;
}

static int vmsocket_check_bars(struct pci_dev *pdev, u32 bufsize)
{
	if (!(pci_resource_flags(pdev, VMSOCKET_BAR_REGS) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, VMSOCKET_BAR_REGS) < VMSOCKET_REGS_SIZE) {
		dev_err(&pdev->dev, "BAR0 is not a %d byte MMIO BAR\n",
			VMSOCKET_REGS_SIZE);
		return -ENODEV;
	}
	if (!(pci_resource_flags(pdev, VMSOCKET_BAR_IN) & IORESOURCE_MEM) ||
	    !(pci_resource_flags(pdev, VMSOCKET_BAR_OUT) & IORESOURCE_MEM)) {
		dev_err(&pdev->dev, "BAR1/BAR2 are not MMIO BARs\n");
		return -ENODEV;
	}
	if (bufsize) {
		if (!is_power_of_2(bufsize) || bufsize < VMSOCKET_BUFSIZE_MIN ||
		    bufsize > VMSOCKET_BUFSIZE_MAX ||
		    pci_resource_len(pdev, VMSOCKET_BAR_IN) < bufsize ||
		    pci_resource_len(pdev, VMSOCKET_BAR_OUT) < bufsize) {
			dev_err(&pdev->dev, "bad buffer size %u\n", bufsize);
			return -ENODEV;
		}
	}
	return 0;
}

/*
 * Map BAR1, BAR2 and (stream mode) BAR3. They are not registers but the
 * hypervisor's RAM (the ABI says RAM-backed): QEMU reads and writes them
 * through its own cached mapping, so they are coherent with the guest's
 * caches, and write-back is the one mapping that is both correct and fast.
 * memremap(MEMREMAP_WB) gives a plain memory pointer: copy_{to,from}_user
 * work on it directly (one copy per byte, no staging buffer) and the
 * control page takes READ_ONCE/WRITE_ONCE and the virt_*() barriers, as
 * virtio does for its rings in guest RAM. An uncached or write-combining
 * mapping would make every read of the input ring and of the indices an
 * uncached access (slow wherever the guest's memory type counts, e.g. AMD
 * NPT; under Intel EPT KVM overrides it with write-back anyway, under TCG
 * it makes no difference).
 */
static int vmsocket_map(struct vmsocket_dev *vd)
{
	struct pci_dev *pdev = vd->pdev;

	vd->inbuf = memremap(pci_resource_start(pdev, VMSOCKET_BAR_IN),
			     vd->bufsize, MEMREMAP_WB);
	vd->outbuf = memremap(pci_resource_start(pdev, VMSOCKET_BAR_OUT),
			      vd->bufsize, MEMREMAP_WB);
	if (!vd->inbuf || !vd->outbuf)
		return -ENOMEM;
	if (!(vd->features & VMSOCKET_F_STREAM))
		return 0;
	if (!(pci_resource_flags(pdev, VMSOCKET_BAR_RING) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, VMSOCKET_BAR_RING) < VMSOCKET_RING_SIZE) {
		dev_warn(&pdev->dev, "FEATURES.STREAM without a ring BAR: v1 only\n");
		vd->features &= ~VMSOCKET_F_STREAM;
		return 0;
	}
	vd->ring = memremap(pci_resource_start(pdev, VMSOCKET_BAR_RING),
			    VMSOCKET_RING_SIZE, MEMREMAP_WB);
	return vd->ring ? 0 : -ENOMEM;
}

static void vmsocket_unmap(struct vmsocket_dev *vd)
{
	if (vd->ring)
		memunmap(vd->ring);
	if (vd->outbuf)
		memunmap(vd->outbuf);
	if (vd->inbuf)
		memunmap(vd->inbuf);
	vd->ring = NULL;
	vd->outbuf = NULL;
	vd->inbuf = NULL;
}

static u32 vmsocket_imr(struct vmsocket_dev *vd)
{
	return vd->ring ? VMSOCKET_INT_ALL : VMSOCKET_INT_DONE;
}

static int vmsocket_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct vmsocket_dev *vd;
	u32 version;
	int ret;

	vd = kzalloc(sizeof(*vd), GFP_KERNEL);
	if (!vd)
		return -ENOMEM;
	kref_init(&vd->kref);
	mutex_init(&vd->lock);
	mutex_init(&vd->rx_lock);
	mutex_init(&vd->tx_lock);
	spin_lock_init(&vd->gflags_lock);
	init_waitqueue_head(&vd->wq);
	init_waitqueue_head(&vd->rx_wq);
	init_waitqueue_head(&vd->tx_wq);
	vd->pdev = pdev;
	vd->id = -1;

	ret = pci_enable_device_mem(pdev);
	if (ret)
		goto err_free;
	ret = vmsocket_check_bars(pdev, 0);
	if (ret)
		goto err_disable;
	ret = pci_request_mem_regions(pdev, DRV_NAME);
	if (ret)
		goto err_disable;
	pci_set_master(pdev);

	vd->regs = pci_iomap(pdev, VMSOCKET_BAR_REGS, VMSOCKET_REGS_SIZE);
	if (!vd->regs) {
		ret = -ENOMEM;
		goto err_regions;
	}
	version = ioread32(vd->regs + VMSOCKET_VERSION);
	if (version != VMSOCKET_ABI_VERSION) {
		dev_err(&pdev->dev, "unsupported ABI version %u (want %u)\n",
			version, VMSOCKET_ABI_VERSION);
		ret = -ENODEV;
		goto err_unmap;
	}
	vd->bufsize = ioread32(vd->regs + VMSOCKET_BUFSIZE);
	ret = vmsocket_check_bars(pdev, vd->bufsize);
	if (ret || !vd->bufsize) {
		ret = -ENODEV;
		goto err_unmap;
	}
	vd->chunk = min_t(u32, vd->bufsize, VMSOCKET_CHUNK_MAX);

	vd->features = ioread32(vd->regs + VMSOCKET_FEATURES);
	ret = vmsocket_map(vd);
	if (ret)
		goto err_unmap;

	/*
	 * Interrupts off until the handler is in place, and the device in a
	 * known state: after kexec, or a driver rebind, it may still hold a
	 * connection or a pending action from before.
	 */
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	ret = vmsocket_hw_reset(vd);
	if (ret) {
		dev_err(&pdev->dev, "device does not settle after CANCEL/CLOSE\n");
		goto err_unmap;
	}

	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_ALL_TYPES);
	if (ret < 0)
		goto err_unmap;
	ret = request_irq(pci_irq_vector(pdev, 0), vmsocket_irq, IRQF_SHARED,
			  DRV_NAME, vd);
	if (ret)
		goto err_vectors;

	ret = ida_alloc(&vmsocket_ida, GFP_KERNEL);
	if (ret < 0)
		goto err_irq;
	vd->id = ret;
	snprintf(vd->name, sizeof(vd->name), "vmsocket%d", vd->id);

	pci_set_drvdata(pdev, vd);
	iowrite32(vmsocket_imr(vd), vd->regs + VMSOCKET_IMR);

	vd->misc.minor = MISC_DYNAMIC_MINOR;
	vd->misc.name = vd->name;
	vd->misc.fops = &vmsocket_fops;
	vd->misc.parent = &pdev->dev;
	ret = misc_register(&vd->misc);
	if (ret)
		goto err_ida;

	dev_info(&pdev->dev, "/dev/%s: buffers %u bytes, %s, %s interrupt\n",
		 vd->name, vd->bufsize, vd->ring ? "stream mode" : "v1 only",
		 pdev->msix_enabled ? "MSI-X" :
		 pdev->msi_enabled ? "MSI" : "INTx");
	return 0;

err_ida:
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	ida_free(&vmsocket_ida, vd->id);
err_irq:
	free_irq(pci_irq_vector(pdev, 0), vd);
err_vectors:
	pci_free_irq_vectors(pdev);
err_unmap:
	vmsocket_unmap(vd);
	pci_iounmap(pdev, vd->regs);
err_regions:
	pci_release_mem_regions(pdev);
err_disable:
	pci_disable_device(pdev);
err_free:
	kref_put(&vd->kref, vmsocket_free);
	return ret;
}

static void vmsocket_remove(struct pci_dev *pdev)
{
	struct vmsocket_dev *vd = pci_get_drvdata(pdev);

	/* Make waiters cancel their action and give up the lock. */
	WRITE_ONCE(vd->gone, true);
	vmsocket_wake_all(vd);

	/* No new open() once this returns; open() runs under misc_mtx. */
	misc_deregister(&vd->misc);

	/* Stream readers and writers leave the rings before they go away. */
	vmsocket_lock_all(vd);
	if (!vd->conn_reset)
		vmsocket_disconnect(vd);
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	vmsocket_unlock_all(vd);

	free_irq(pci_irq_vector(pdev, 0), vd);
	pci_free_irq_vectors(pdev);
	vmsocket_unmap(vd);
	pci_iounmap(pdev, vd->regs);
	pci_release_mem_regions(pdev);
	pci_disable_device(pdev);
	ida_free(&vmsocket_ida, vd->id);

	/* Open files keep vd alive; their operations now return -ENODEV. */
	kref_put(&vd->kref, vmsocket_free);
}

/*
 * Reboot, kexec: leave the device closed and quiet for whatever runs next
 * (a kexec'd kernel would otherwise find it connected, EISCONN, with
 * interrupts enabled). Blocked callers see "gone" and return -ENODEV.
 */
static void vmsocket_shutdown(struct pci_dev *pdev)
{
	struct vmsocket_dev *vd = pci_get_drvdata(pdev);

	WRITE_ONCE(vd->gone, true);
	vmsocket_wake_all(vd);
	vmsocket_lock_all(vd);
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	if (!vd->broken)
		vmsocket_hw_reset(vd);
	vd->busy = false;
	vmsocket_unlock_all(vd);
}

/*
 * Suspend: the connection does not survive (QEMU resets the device on S3
 * resume, and the host end may be gone): close it; the open file then
 * reports ECONNRESET and POLLHUP, and a new open() connects again.
 */
static int vmsocket_suspend(struct device *dev)
{
	struct vmsocket_dev *vd = dev_get_drvdata(dev);

	vmsocket_lock_all(vd);
	if (vd->busy) {
		vmsocket_disconnect(vd);
		vmsocket_conn_reset(vd);
		WRITE_ONCE(vd->conn_reset, true);
	}
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	vmsocket_unlock_all(vd);
	vmsocket_wake_all(vd);
	return 0;
}

/* Resume: the device may have been reset or not; make it known, re-arm. */
static int vmsocket_resume(struct device *dev)
{
	struct vmsocket_dev *vd = dev_get_drvdata(dev);

	mutex_lock(&vd->lock);
	if (vmsocket_hw_reset(vd))
		vmsocket_break(vd, "device does not settle after resume");
	else
		WRITE_ONCE(vd->broken, false);
	iowrite32(vmsocket_imr(vd), vd->regs + VMSOCKET_IMR);
	mutex_unlock(&vd->lock);
	vmsocket_wake_all(vd);
	return 0;
}

static DEFINE_SIMPLE_DEV_PM_OPS(vmsocket_pm_ops, vmsocket_suspend,
				vmsocket_resume);

static const struct pci_device_id vmsocket_ids[] = {
	{ PCI_DEVICE(PCI_VENDOR_ID_REDHAT_QUMRANET, VMSOCKET_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vmsocket_ids);

static struct pci_driver vmsocket_driver = {
	.name		= DRV_NAME,
	.id_table	= vmsocket_ids,
	.probe		= vmsocket_probe,
	.remove		= vmsocket_remove,
	.shutdown	= vmsocket_shutdown,
	.driver.pm	= pm_sleep_ptr(&vmsocket_pm_ops),
};

static int __init vmsocket_init(void)
{
	return pci_register_driver(&vmsocket_driver);
}

static void __exit vmsocket_exit(void)
{
	pci_unregister_driver(&vmsocket_driver);
	ida_destroy(&vmsocket_ida);
}

module_init(vmsocket_init);
module_exit(vmsocket_exit);

MODULE_DESCRIPTION("vmsocket: host UNIX socket over a PCI device");
MODULE_AUTHOR("qemupatch project");
MODULE_LICENSE("GPL");
