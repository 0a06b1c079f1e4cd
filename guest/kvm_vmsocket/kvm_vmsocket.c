// SPDX-License-Identifier: GPL-2.0
/*
 * kvm_vmsocket - guest driver for the vmsocket PCI device (1af4:10f0)
 *
 * The device connects the guest to a UNIX socket on the host. Each PCI
 * device becomes one character device, /dev/vmsocket<N>:
 *
 *   open()  = CONNECT, close() = CLOSE,
 *   write() = copy into the output buffer (BAR2) + WRITECOMMIT, in chunks,
 *   read()  = READ into the input buffer (BAR1) + copy out.
 *
 * The register map and the STATUS/-EINPROGRESS/ISR/CANCEL protocol are
 * described in docs/vmsocket-abi.md, the driver's rules in
 * docs/vmsocket-driver.md. The device is half-duplex: one action at a time,
 * serialised here by a per-device mutex. The device is not trusted: every
 * STATUS is checked before it reaches user space, every wait is bounded
 * where user space cannot interrupt it, and a device that ignores CANCEL
 * latches the driver into a "broken" state (-EIO) until it is reset.
 */

#include <linux/bitops.h>
#include <linux/delay.h>
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/pm.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#define DRV_NAME		"kvm_vmsocket"

#define VMSOCKET_DEVICE_ID	0x10f0
#define VMSOCKET_ABI_VERSION	1

/* BAR numbers */
#define VMSOCKET_BAR_REGS	0
#define VMSOCKET_BAR_IN		1
#define VMSOCKET_BAR_OUT	2

/* BAR0 registers */
#define VMSOCKET_STATUS		0x00
#define VMSOCKET_VERSION	0x04
#define VMSOCKET_BUFSIZE	0x08
#define VMSOCKET_ISR		0x0c
#define VMSOCKET_IMR		0x10
#define VMSOCKET_CONNECT	0x20
#define VMSOCKET_CLOSE		0x30
#define VMSOCKET_WRITECOMMIT	0x40
#define VMSOCKET_CANCEL		0x50
#define VMSOCKET_READ		0x60
#define VMSOCKET_REGS_SIZE	0x100

#define VMSOCKET_INT_DONE	BIT(0)

#define VMSOCKET_BUFSIZE_MIN	SZ_4K
#define VMSOCKET_BUFSIZE_MAX	SZ_64M
/* Largest chunk moved per action. */
#define VMSOCKET_CHUNK_MAX	SZ_4M
/* user <-> BAR copies go through a staging buffer of this size (see copy_*) */
#define VMSOCKET_STAGE		SZ_16K

/* How long to wait for the device to honour CANCEL. */
#define VMSOCKET_CANCEL_TIMEOUT	(5 * HZ)
/* open() runs under misc_open()'s global mutex: CONNECT gets this long. */
#define VMSOCKET_CONNECT_TIMEOUT (5 * HZ)
/* close(): how long CLOSE, or a queued O_NONBLOCK write, may take. */
#define VMSOCKET_CLOSE_TIMEOUT	(5 * HZ)
/* Re-check STATUS this often even without an interrupt (lost IRQ). */
#define VMSOCKET_POLL_INTERVAL	HZ

/* vmsocket_dev.flags */
#define VMSOCKET_OPEN		0	/* a file is open: others get -EBUSY */

struct vmsocket_dev {
	struct pci_dev *pdev;
	void __iomem *regs;
	void __iomem *inbuf;
	void __iomem *outbuf;
	u32 bufsize;
	u32 chunk;
	void *stage;			/* VMSOCKET_STAGE bytes, under lock */
	int id;
	char name[24];
	struct miscdevice misc;
	struct kref kref;		/* probe + each open file */
	wait_queue_head_t wq;		/* DONE interrupt, state changes */
	unsigned long flags;		/* VMSOCKET_OPEN, atomic */
	atomic_t poll_missed;		/* poll() found the lock taken */
	struct mutex lock;		/* serialises actions and the state below */
	bool busy;			/* connected */
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

	kfree(vd->stage);
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

/* The device did not honour CANCEL: no more hardware actions until reset. */
static void vmsocket_break(struct vmsocket_dev *vd, const char *why)
{
	if (!vd->broken)
		dev_err(&vd->pdev->dev,
			"%s; device out of step, disabled until reset\n", why);
	vd->broken = true;
	wake_up_all(&vd->wq);
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
		 * is mapped write-combining, and WC reads may be speculated
		 * ahead of the uncached STATUS read: order them.
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
	if (vd->gone)
		return -ENODEV;
	if (vd->broken)
		return -EIO;
	if (vd->conn_reset)
		return -ECONNRESET;
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
out:
	vd->busy = false;
}

static int vmsocket_release(struct inode *inode, struct file *file)
{
	struct vmsocket_dev *vd = file->private_data;

	mutex_lock(&vd->lock);
	if (!vd->conn_reset && !vd->gone)
		vmsocket_disconnect(vd);
	vd->busy = false;
	vmsocket_conn_reset(vd);
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
 * BAR <-> user copies. An __iomem mapping may only be accessed with the
 * io accessors (copy_{to,from}_user on it is wrong on architectures where
 * MMIO needs special instructions or alignment), so each byte is copied
 * twice: through a 16 KiB staging buffer that stays in the CPU cache,
 * instead of the former bounce buffer of a whole chunk (up to 4 MiB, out
 * of cache by the time memcpy_toio read it back).
 */
static int vmsocket_copy_to_bar(struct vmsocket_dev *vd, const char __user *buf,
				size_t len)
{
	size_t off, n;

	for (off = 0; off < len; off += n) {
		n = min_t(size_t, len - off, VMSOCKET_STAGE);
		if (copy_from_user(vd->stage, buf + off, n))
			return -EFAULT;
		memcpy_toio(vd->outbuf + off, vd->stage, n);
	}
	return 0;
}

static int vmsocket_copy_from_bar(struct vmsocket_dev *vd, char __user *buf,
				  u32 from, size_t len)
{
	size_t off, n;

	for (off = 0; off < len; off += n) {
		n = min_t(size_t, len - off, VMSOCKET_STAGE);
		memcpy_fromio(vd->stage, vd->inbuf + from + off, n);
		if (copy_to_user(buf + off, vd->stage, n))
			return -EFAULT;
	}
	return 0;
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
	if (isr == ~0U || !(isr & VMSOCKET_INT_DONE))
		return IRQ_NONE;	/* shared INTx, or device gone */
	iowrite32(VMSOCKET_INT_DONE, vd->regs + VMSOCKET_ISR);
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
	iowrite32(VMSOCKET_INT_DONE, vd->regs + VMSOCKET_ISR);
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
	init_waitqueue_head(&vd->wq);
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

	/* The buffers are RAM-backed and prefetchable: map write-combining. */
	vd->inbuf = pci_iomap_wc(pdev, VMSOCKET_BAR_IN, vd->bufsize);
	vd->outbuf = pci_iomap_wc(pdev, VMSOCKET_BAR_OUT, vd->bufsize);
	if (!vd->inbuf || !vd->outbuf) {
		ret = -ENOMEM;
		goto err_unmap;
	}
	vd->stage = kmalloc(VMSOCKET_STAGE, GFP_KERNEL);
	if (!vd->stage) {
		ret = -ENOMEM;
		goto err_unmap;
	}

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
	iowrite32(VMSOCKET_INT_DONE, vd->regs + VMSOCKET_IMR);

	vd->misc.minor = MISC_DYNAMIC_MINOR;
	vd->misc.name = vd->name;
	vd->misc.fops = &vmsocket_fops;
	vd->misc.parent = &pdev->dev;
	ret = misc_register(&vd->misc);
	if (ret)
		goto err_ida;

	dev_info(&pdev->dev, "/dev/%s: buffers %u bytes, %s interrupt\n",
		 vd->name, vd->bufsize,
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
	if (vd->outbuf)
		pci_iounmap(pdev, vd->outbuf);
	if (vd->inbuf)
		pci_iounmap(pdev, vd->inbuf);
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
	wake_up_all(&vd->wq);

	/* No new open() once this returns; open() runs under misc_mtx. */
	misc_deregister(&vd->misc);

	mutex_lock(&vd->lock);
	if (!vd->conn_reset)
		vmsocket_disconnect(vd);
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	mutex_unlock(&vd->lock);

	free_irq(pci_irq_vector(pdev, 0), vd);
	pci_free_irq_vectors(pdev);
	pci_iounmap(pdev, vd->outbuf);
	pci_iounmap(pdev, vd->inbuf);
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
	wake_up_all(&vd->wq);
	mutex_lock(&vd->lock);
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	if (!vd->broken)
		vmsocket_hw_reset(vd);
	vd->busy = false;
	mutex_unlock(&vd->lock);
}

/*
 * Suspend: the connection does not survive (QEMU resets the device on S3
 * resume, and the host end may be gone): close it; the open file then
 * reports ECONNRESET and POLLHUP, and a new open() connects again.
 */
static int vmsocket_suspend(struct device *dev)
{
	struct vmsocket_dev *vd = dev_get_drvdata(dev);

	mutex_lock(&vd->lock);
	if (vd->busy) {
		vmsocket_disconnect(vd);
		vmsocket_conn_reset(vd);
		vd->conn_reset = true;
	}
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	mutex_unlock(&vd->lock);
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
		vd->broken = false;
	iowrite32(VMSOCKET_INT_DONE, vd->regs + VMSOCKET_IMR);
	mutex_unlock(&vd->lock);
	wake_up_all(&vd->wq);
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
