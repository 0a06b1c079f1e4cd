"""qemupatch: keep the vmsocket device alive on modern QEMU.

The pipeline, one module per stage:

    upstream   import upstream QEMU releases into a local mirror
    series     the patch series in patches/: read, apply, export, check
    rebase     replay the series onto another release, patch by patch
    build      compile QEMU with the series (host or container)
    guest      make a guest: kernel, initramfs, kvm_vmsocket module
    boottest   boot it and prove -vmsocket unix: works end to end
    report     human summaries, JSON and JUnit XML for every stage

Plain dataclasses flow between stages; side effects stay in run.py (commands)
and the stage that owns them.
"""

__version__ = "0.1.0"
