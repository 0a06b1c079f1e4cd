"""listmerge: the patch's insertions carried into lists upstream changed,
and every other conflict refused."""

from qemupatch.listmerge import AFTER_ANCHOR, BEFORE_ANCHOR, SORTED, Recorded, merge, recordable


def text(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def meson(*names: str) -> list[str]:
    return [f"system_ss.add(when: 'CONFIG_{n.upper()}', if_true: files('{n}.c'))" for n in names]


def test_one_sided_changes_merge_without_rules():
    base = text("a", "b", "c", "d", "e")
    ours = text("a", "B", "c", "d", "e")
    theirs = text("a", "b", "c", "d", "E")
    res = merge(base, ours, theirs)
    assert res.text == text("a", "B", "c", "d", "E") and res.placed == ()


def test_sorted_meson_list_keeps_its_order():
    # The patch adds vmsocket after pci; upstream renamed pci and added unimp
    # and tmp: the same region.
    base = text("# misc", *meson("edu", "pci", "zzz"))
    theirs = text("# misc", *meson("edu", "pci", "vmsocket", "zzz"))
    ours = text("# misc", *meson("edu", "pcie", "tmp", "unimp", "zzz"))
    res = merge(base, ours, theirs)
    assert res.text == text("# misc", *meson("edu", "pcie", "tmp", "unimp", "vmsocket", "zzz"))
    assert [p.rule for p in res.placed] == [SORTED]
    assert res.inserted == tuple(meson("vmsocket"))


def test_toctree_entry_goes_where_the_toctree_stays_sorted():
    head = (".. toctree::", "   :maxdepth: 1", "")
    base = text(*head, "   devices/can.rst", "   devices/usb.rst", "   devices/vfio-user.rst")
    theirs = text(*head, "   devices/can.rst", "   devices/usb.rst", "   devices/vfio-user.rst",
                  "   devices/vmsocket.rst")
    ours = text(*head, "   devices/can.rst", "   devices/igb.rst", "   devices/usb.rst")
    res = merge(base, ours, theirs)
    assert res.text == text(*head, "   devices/can.rst", "   devices/igb.rst", "   devices/usb.rst",
                            "   devices/vmsocket.rst")
    assert res.inserted == ("   devices/vmsocket.rst",)


def test_unsorted_list_falls_back_to_the_line_the_insertion_preceded():
    # 10.0.2's toctree is not sorted and lacks the line the patch followed:
    # the entry goes before what it preceded in base (here the end of file).
    base = text("   devices/usb.rst", "   devices/vfio-user.rst")
    theirs = text("   devices/usb.rst", "   devices/vfio-user.rst", "   devices/vmsocket.rst")
    ours = text("   devices/usb.rst", "   devices/virtio-gpu.rst", "   devices/canokey.rst")
    res = merge(base, ours, theirs)
    assert res.text == ours + text("   devices/vmsocket.rst")
    assert [p.rule for p in res.placed] == [BEFORE_ANCHOR]


def test_unsorted_list_insertion_follows_its_anchor_line():
    base = text("zeta", "beta", "alpha", "omega")
    theirs = text("zeta", "beta", "new", "alpha", "omega")
    ours = text("zeta", "beta", "gamma", "alpha2", "omega")  # alpha changed upstream
    res = merge(base, ours, theirs)
    assert res.text == text("zeta", "beta", "new", "gamma", "alpha2", "omega")
    assert [p.rule for p in res.placed] == [AFTER_ANCHOR]


SECTION = ("vmsocket", "M: qemupatch developers <qemupatch@localhost>", "S: Maintained",
           "F: hw/misc/vmsocket.c", "")


def maintainers(*sections: tuple[str, ...]) -> str:
    return text(*[line for sec in sections for line in (*sec, "")])


def test_maintainers_section_follows_its_anchor_section():
    edu = ("EDU", "M: Jiri Slaby <jslaby@suse.cz>", "S: Maintained", "F: hw/misc/edu.c")
    ide = ("IDE", "M: John Snow <jsnow@redhat.com>", "S: Odd Fixes", "F: hw/ide/")
    alpha = ("Alpha", "M: Someone <a@b>", "S: Maintained", "F: target/alpha/")
    base = maintainers(alpha, edu, ide)
    theirs = maintainers(alpha, edu, SECTION[:-1], ide)
    # Upstream renamed the section the new one preceded: a conflict.
    ide2 = ("IDE and CD-ROM", *ide[1:])
    ours = maintainers(alpha, edu, ide2)
    res = merge(base, ours, theirs)
    assert res.text == maintainers(alpha, edu, SECTION[:-1], ide2)
    assert res.inserted == SECTION
    assert [p.rule for p in res.placed] == [AFTER_ANCHOR]


def test_maintainers_section_goes_where_titles_stay_sorted():
    def sec(name):
        return (name, "S: Maintained", f"F: {name.lower()}/")
    base = maintainers(sec("Alpha"), sec("Beta"), sec("Delta"))
    theirs = maintainers(sec("Alpha"), sec("Beta"), sec("Charlie"), sec("Delta"))
    # Upstream added Bravo where the patch added Charlie; sorted titles put
    # Charlie after Bravo, not right after its anchor Beta.
    ours = maintainers(sec("Alpha"), sec("Beta"), sec("Bravo"), sec("Delta"))
    res = merge(base, ours, theirs)
    assert res.text == maintainers(sec("Alpha"), sec("Beta"), sec("Bravo"), sec("Charlie"),
                                   sec("Delta"))
    assert [p.rule for p in res.placed] == [SORTED]


def test_maintainers_file_line_into_a_section_upstream_changed():
    base = text("vmsocket", "S: Maintained", "F: hw/misc/vmsocket.c",
                "F: include/hw/misc/vmsocket.h", "F: docs/system/devices/vmsocket.rst", "", "IDE")
    theirs = base.replace("vmsocket.rst\n", "vmsocket.rst\nF: tests/qtest/vmsocket-test.c\n")
    ours = text("vmsocket", "S: Maintained", "F: hw/misc/vmsocket.c",
                "F: include/hw/misc/vmsocket.h", "", "IDE")
    res = merge(base, ours, theirs)
    assert res.text == text("vmsocket", "S: Maintained", "F: hw/misc/vmsocket.c",
                            "F: include/hw/misc/vmsocket.h", "F: tests/qtest/vmsocket-test.c",
                            "", "IDE")
    assert [p.rule for p in res.placed] == [SORTED]


def test_refuses_a_line_the_patch_changed_that_upstream_changed_too():
    base = text("a", "b", "c")
    res = merge(base, text("a", "B upstream", "c"), text("a", "B patch", "c"))
    assert res.text is None and "changes or removes base line 2" in res.reason


def test_refuses_a_deletion_next_to_an_upstream_change():
    base = text(*meson("a", "b", "c"))
    ours = text(*meson("a", "b", "bb", "c"))
    theirs = text(*meson("a", "c"))
    res = merge(base, ours, theirs)
    assert res.text is None and "changes or removes" in res.reason


def test_refuses_when_no_anchor_survives_and_the_list_is_unsorted():
    base = text("top", "pear", "fig", "apple", "kiwi", "end")
    theirs = text("top", "pear", "fig", "new", "apple", "kiwi", "end")
    ours = text("top", "Pear", "Fig", "Apple", "Kiwi", "end")
    res = merge(base, ours, theirs)
    assert res.text is None and "no place for 'new'" in res.reason


def test_refuses_an_insertion_already_upstream_in_a_sorted_list():
    base = text(*meson("a", "c"))
    theirs = text(*meson("a", "b", "c"))
    ours = text(*meson("a", "b", "bb", "c"))
    res = merge(base, ours, theirs)
    assert res.text is None and "already upstream" in res.reason


def test_a_recorded_resolution_is_cut_out_and_replayed():
    base = text("a", "b", "c")
    ours, theirs = text("a", "B upstream", "c"), text("a", "B patch", "c")
    resolved = text("a", "B upstream and patch", "c")
    [(upstream, patch, resolution)] = recordable(base, ours, theirs, resolved)
    assert (upstream, patch, resolution) == (("B upstream\n",), ("B patch\n",),
                                              ("B upstream and patch\n",))
    rec = Recorded("0123.txt", upstream, patch, resolution)
    # Elsewhere in a longer file, with different base lines: the same key.
    res = merge(text("x", "a", "b", "c"), text("x", "a", "B upstream  ", "c"),
                text("x", "a", "B patch", "c"), {rec.key: rec})
    assert res.text == text("x", "a", "B upstream and patch", "c")
    assert [p.rule for p in res.placed] == ["recorded:0123.txt"]
    # A different conflict is not replayed.
    res = merge(base, text("a", "B other", "c"), theirs, {rec.key: rec})
    assert res.text is None


def test_a_resolution_that_edits_outside_the_conflict_is_not_recordable():
    base = text("a", "b", "c")
    ours, theirs = text("a", "B upstream", "c"), text("a", "B patch", "c")
    assert recordable(base, ours, theirs, text("A edited", "B both", "c")) is None


def test_an_insertion_with_a_blank_line_next_to_upstream_blank_lines():
    # trace-events: the patch appends a commented group; upstream's end differs.
    base = text("a_read(void) \"\"", "", "# b.c", "b_one(void) \"\"")
    theirs = base + text("", "# vmsocket.c", "vmsocket_read(void) \"\"")
    ours = text("a_read(void) \"\"", "", "# c.c", "c_one(void) \"\"", "", "# d.c")
    res = merge(base, ours, theirs)
    assert res.text == ours + text("", "# vmsocket.c", "vmsocket_read(void) \"\"")
    assert [p.rule for p in res.placed] == [BEFORE_ANCHOR]
