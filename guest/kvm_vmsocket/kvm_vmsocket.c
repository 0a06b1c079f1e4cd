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
 * described in docs/vmsocket-abi.md. The device is half-duplex: one action
 * at a time, serialised here by a per-device mutex.
 */

#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
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
/* Largest chunk moved per action; bounds the bounce buffer. */
#define VMSOCKET_CHUNK_MAX	SZ_4M

/* How long to wait for the device to honour CANCEL or CLOSE. */
#define VMSOCKET_CANCEL_TIMEOUT	(5 * HZ)
/* Re-check STATUS this often even without an interrupt (lost IRQ). */
#define VMSOCKET_POLL_INTERVAL	HZ

struct vmsocket_dev {
	struct pci_dev *pdev;
	void __iomem *regs;
	void __iomem *inbuf;
	void __iomem *outbuf;
	u32 bufsize;
	u32 chunk;
	void *bounce;			/* chunk bytes, for copy_{to,from}_user */
	int id;
	char name[24];
	struct miscdevice misc;
	struct kref kref;		/* probe + each open file */
	wait_queue_head_t wq;		/* woken by the DONE interrupt */
	struct mutex lock;		/* serialises actions and the state below */
	bool busy;			/* opened (connected) */
	bool gone;			/* remove() has started; no more hardware access */
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
};

/* How a caller waits for its action to complete. */
enum vmsocket_wait {
	VMSOCKET_WAIT_UNINTERRUPTIBLE,	/* CLOSE */
	VMSOCKET_WAIT_INTERRUPTIBLE,	/* signals cancel the action */
	VMSOCKET_WAIT_NONBLOCK,		/* O_NONBLOCK: cancel unless done at once */
};

static DEFINE_IDA(vmsocket_ida);

static void vmsocket_free(struct kref *kref)
{
	struct vmsocket_dev *vd = container_of(kref, struct vmsocket_dev, kref);

	kvfree(vd->bounce);
	kfree(vd);
}

static s32 vmsocket_status(struct vmsocket_dev *vd)
{
	return (s32)ioread32(vd->regs + VMSOCKET_STATUS);
}

static bool vmsocket_settled(struct vmsocket_dev *vd)
{
	return vmsocket_status(vd) != -EINPROGRESS;
}

static bool vmsocket_wake_cond(struct vmsocket_dev *vd)
{
	return READ_ONCE(vd->gone) || vmsocket_settled(vd);
}

/*
 * Cancel the pending action, if any, and wait (uninterruptibly, bounded)
 * for STATUS to leave -EINPROGRESS. CANCEL with nothing pending is a no-op
 * in the device, so racing the completion is harmless.
 */
static s32 vmsocket_cancel(struct vmsocket_dev *vd)
{
	iowrite32(1, vd->regs + VMSOCKET_CANCEL);
	if (!wait_event_timeout(vd->wq, vmsocket_settled(vd),
				VMSOCKET_CANCEL_TIMEOUT)) {
		dev_err(&vd->pdev->dev, "device ignored CANCEL\n");
		return -EIO;
	}
	return vmsocket_status(vd);
}

/*
 * Wait for the action just started to complete. Called with vd->lock held.
 * Returns the final STATUS. *cancelled is set when a signal, O_NONBLOCK or
 * remove() made us cancel it; STATUS then tells what the action still
 * achieved.
 */
static s32 vmsocket_wait(struct vmsocket_dev *vd, enum vmsocket_wait mode,
			 bool *cancelled)
{
	long ret;

	*cancelled = false;
	for (;;) {
		if (vmsocket_settled(vd))
			return vmsocket_status(vd);
		if (READ_ONCE(vd->gone) || mode == VMSOCKET_WAIT_NONBLOCK)
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
			   enum vmsocket_wait mode, bool *cancelled)
{
	if (reg == VMSOCKET_CONNECT || reg == VMSOCKET_CLOSE)
		iowrite16(val, vd->regs + reg);
	else
		iowrite32(val, vd->regs + reg);
	return vmsocket_wait(vd, mode, cancelled);
}

static bool vmsocket_rx_ready(struct vmsocket_dev *vd)
{
	return vd->rx_avail || vd->rx_eof || vd->rx_err;
}

static void vmsocket_rx_reset(struct vmsocket_dev *vd)
{
	vd->rx_pending = false;
	vd->rx_eof = false;
	vd->rx_err = 0;
	vd->rx_off = 0;
	vd->rx_avail = 0;
}

/* Record the result of the READ that was pending. Called with vd->lock. */
static void vmsocket_rx_collect(struct vmsocket_dev *vd, s32 st)
{
	vd->rx_pending = false;
	if (st > 0 && st <= vd->chunk) {
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
	iowrite32(vd->chunk, vd->regs + VMSOCKET_READ);
	vd->rx_pending = true;
	if (vmsocket_settled(vd))
		vmsocket_rx_collect(vd, vmsocket_status(vd));
}

/* Before another action: end a pending READ, keeping what it received. */
static void vmsocket_rx_settle(struct vmsocket_dev *vd)
{
	if (!vd->rx_pending)
		return;
	if (vmsocket_settled(vd))
		vmsocket_rx_collect(vd, vmsocket_status(vd));
	else
		vmsocket_rx_collect(vd, vmsocket_cancel(vd));
}

static int vmsocket_open(struct inode *inode, struct file *file)
{
	struct miscdevice *misc = file->private_data;
	struct vmsocket_dev *vd = container_of(misc, struct vmsocket_dev, misc);
	bool cancelled;
	s32 st;
	int ret;

	/* misc_open() holds misc_mtx, so remove() cannot free vd under us. */
	kref_get(&vd->kref);
	file->private_data = vd;

	ret = mutex_lock_interruptible(&vd->lock);
	if (ret)
		goto put;
	if (vd->gone) {
		ret = -ENODEV;
		goto unlock;
	}
	if (vd->busy) {
		ret = -EBUSY;
		goto unlock;
	}

	st = vmsocket_action(vd, VMSOCKET_CONNECT, 1,
			     VMSOCKET_WAIT_INTERRUPTIBLE, &cancelled);
	if (st < 0) {
		ret = (cancelled && st == -EINTR) ? -ERESTARTSYS : st;
		if (vd->gone)
			ret = -ENODEV;
		goto unlock;
	}
	vd->busy = true;
	vmsocket_rx_reset(vd);
	mutex_unlock(&vd->lock);
	return stream_open(inode, file);

unlock:
	mutex_unlock(&vd->lock);
put:
	kref_put(&vd->kref, vmsocket_free);
	return ret;
}

static int vmsocket_release(struct inode *inode, struct file *file)
{
	struct vmsocket_dev *vd = file->private_data;
	bool cancelled;
	s32 st;

	mutex_lock(&vd->lock);
	if (!vd->gone && vd->busy) {
		vmsocket_rx_settle(vd);
		st = vmsocket_action(vd, VMSOCKET_CLOSE, 1,
				     VMSOCKET_WAIT_UNINTERRUPTIBLE, &cancelled);
		if (st < 0 && st != -ENOTCONN)
			dev_dbg(&vd->pdev->dev, "CLOSE: %d\n", st);
	}
	vd->busy = false;
	vmsocket_rx_reset(vd);
	mutex_unlock(&vd->lock);
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
	if (file->f_flags & O_NONBLOCK) {
		*mode = VMSOCKET_WAIT_NONBLOCK;
		return mutex_trylock(&vd->lock) ? 0 : -EAGAIN;
	}
	*mode = VMSOCKET_WAIT_INTERRUPTIBLE;
	return mutex_lock_interruptible(&vd->lock) ? -ERESTARTSYS : 0;
}

/* The errno for an action that was cancelled before it moved any byte. */
static int vmsocket_cancelled_err(enum vmsocket_wait mode)
{
	return mode == VMSOCKET_WAIT_NONBLOCK ? -EAGAIN : -ERESTARTSYS;
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
	if (vd->gone) {
		ret = -ENODEV;
		goto out;
	}

	if (!vmsocket_rx_ready(vd)) {
		if (!vd->rx_pending)
			vmsocket_rx_start(vd);
		if (vd->rx_pending) {
			if (mode == VMSOCKET_WAIT_NONBLOCK) {
				/* leave the READ pending for poll() */
				ret = -EAGAIN;
				goto out;
			}
			st = vmsocket_wait(vd, mode, &cancelled);
			vmsocket_rx_collect(vd, st);
			if (vd->gone) {
				ret = -ENODEV;
				goto out;
			}
			/* A READ cancelled after data arrived keeps that data. */
			if (!vmsocket_rx_ready(vd)) {
				ret = cancelled && st == -EINTR ? -ERESTARTSYS : -EIO;
				goto out;
			}
		}
	}

	if (vd->rx_avail) {
		len = min_t(size_t, count, vd->rx_avail);
		memcpy_fromio(vd->bounce, vd->inbuf + vd->rx_off, len);
		if (copy_to_user(buf, vd->bounce, len)) {
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
	mutex_unlock(&vd->lock);
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
	if (!vd->gone)
		vmsocket_rx_settle(vd);

	while (done < count) {
		if (vd->gone) {
			ret = -ENODEV;
			break;
		}
		if (done && signal_pending(current))
			break;

		len = min_t(size_t, count - done, vd->chunk);
		if (copy_from_user(vd->bounce, buf + done, len)) {
			ret = -EFAULT;
			break;
		}
		memcpy_toio(vd->outbuf, vd->bounce, len);
		/* Make the buffer contents visible before the doorbell. */
		wmb();

		st = vmsocket_action(vd, VMSOCKET_WRITECOMMIT, len, mode,
				     &cancelled);
		if (st > (s32)len) {
			dev_err_ratelimited(&vd->pdev->dev,
					    "WRITECOMMIT %zu returned %d\n",
					    len, st);
			ret = -EIO;
			break;
		}
		if (st < 0) {
			if (vd->gone)
				ret = -ENODEV;
			else if (cancelled && st == -EINTR)
				ret = vmsocket_cancelled_err(mode);
			else
				ret = st;
			break;
		}
		done += st;
		if (cancelled || (size_t)st < len)
			break;
	}
	mutex_unlock(&vd->lock);

	/* Bytes already sent win over the error that stopped us. */
	return done ? done : ret;
}

/*
 * Readable means: data, end of file or an error is waiting for read().
 * To find out, poll() starts a READ and leaves it pending; the DONE
 * interrupt wakes the poller. Writable always: a write() can start at once.
 */
static __poll_t vmsocket_poll(struct file *file, poll_table *wait)
{
	struct vmsocket_dev *vd = file->private_data;
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	poll_wait(file, &vd->wq, wait);
	if (READ_ONCE(vd->gone))
		return EPOLLERR | EPOLLHUP;
	/* Another action in progress: its completion will wake us. */
	if (!mutex_trylock(&vd->lock))
		return mask;
	if (!vd->gone) {
		if (vd->rx_pending && vmsocket_settled(vd))
			vmsocket_rx_collect(vd, vmsocket_status(vd));
		if (!vmsocket_rx_ready(vd) && !vd->rx_pending)
			vmsocket_rx_start(vd);
		if (vmsocket_rx_ready(vd))
			mask |= EPOLLIN | EPOLLRDNORM;
	}
	mutex_unlock(&vd->lock);
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
	vd->bounce = kvmalloc(vd->chunk, GFP_KERNEL);
	if (!vd->bounce) {
		ret = -ENOMEM;
		goto err_unmap;
	}

	/* Interrupts off and acknowledged until the handler is in place. */
	iowrite32(0, vd->regs + VMSOCKET_IMR);
	iowrite32(VMSOCKET_INT_DONE, vd->regs + VMSOCKET_ISR);

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
	bool cancelled;

	/* Make waiters cancel their action and give up the lock. */
	WRITE_ONCE(vd->gone, true);
	wake_up_all(&vd->wq);

	/* No new open() once this returns; open() runs under misc_mtx. */
	misc_deregister(&vd->misc);

	mutex_lock(&vd->lock);
	if (vd->busy) {
		vmsocket_rx_settle(vd);
		vmsocket_action(vd, VMSOCKET_CLOSE, 1,
				VMSOCKET_WAIT_UNINTERRUPTIBLE, &cancelled);
	}
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
