use super::*;
use proptest::prelude::*;

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 1,
        gid: 2,
        mtime_ns: -5,
        ctime_ns: 7,
        ino: 9,
        append_only: false,
        linked: false,
    }
}

fn chunks_of(size: u64, cs: u64) -> Vec<ChunkRef> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let len = cs.min(size - off);
        out.push(ChunkRef {
            off,
            len,
            hash: (off % (3 * cs) != 0).then(|| Id::of(&off.to_le_bytes())),
        });
        off += len;
    }
    out
}

/// Write a tree, return its segments.
fn write(items: &[(Entry, Vec<ChunkRef>)]) -> Vec<Segment> {
    let mut w = TreeWriter::new(1);
    let mut segs = Vec::new();
    for (e, chunks) in items {
        segs.extend(w.entry(e).expect("entry"));
        if !chunks.is_empty() {
            segs.extend(w.chunks(chunks).expect("chunks"));
        }
    }
    let (last, _) = w.finish().expect("finish");
    segs.extend(last);
    segs
}

fn read(segs: &[Segment], cs: u64) -> Result<Vec<(Entry, Vec<ChunkRef>)>, FormatError> {
    let mut r = TreeReader::new(cs);
    let mut out: Vec<(Entry, Vec<ChunkRef>)> = Vec::new();
    for s in segs {
        r.feed(&s.data, "seg")?;
        while let Some(item) = r.next_item()? {
            match item {
                Item::Entry(e) => out.push((e, Vec::new())),
                Item::Chunks(c) => out.last_mut().expect("entry").1.extend(c),
            }
        }
    }
    r.finish()?;
    Ok(out)
}

#[test]
fn walk_order_is_depth_first_by_bytes() {
    let mut paths = vec!["a-b", "a/x", "a", "b", "a/x/y", "a/w", "A"];
    paths.sort_by(|a, b| walk_order(a.as_bytes(), b.as_bytes()));
    assert_eq!(paths, ["A", "a", "a/w", "a/x", "a/x/y", "a-b", "b"]);
}

#[test]
fn hostile_streams_are_refused() {
    let file = |size| EntryKind::File { size };
    let link = EntryKind::Symlink {
        target: b"/etc".to_vec(),
    };
    let cases: Vec<Vec<(Entry, Vec<ChunkRef>)>> = vec![
        vec![(entry("../escape", file(0)), vec![])],
        vec![(entry("/abs", file(0)), vec![])],
        vec![(entry("a/./b", file(0)), vec![])],
        vec![(entry("a//b", file(0)), vec![])],
        // Below a symlink, a file, or a missing directory.
        vec![
            (entry("l", link.clone()), vec![]),
            (entry("l/x", file(0)), vec![]),
        ],
        vec![
            (entry("f", file(0)), vec![]),
            (entry("f/x", file(0)), vec![]),
        ],
        vec![(entry("missing/x", file(0)), vec![])],
        // Out of order, or repeated.
        vec![(entry("b", file(0)), vec![]), (entry("a", file(0)), vec![])],
        vec![(entry("a", file(0)), vec![]), (entry("a", file(0)), vec![])],
    ];
    for items in cases {
        // The writer does not police order or paths; the reader does.
        let mut w = TreeWriter::new(1);
        let mut segs = Vec::new();
        for (e, _) in &items {
            segs.extend(w.entry(e).expect("entry"));
        }
        segs.extend(w.finish().expect("finish").0);
        assert!(read(&segs, 16).is_err(), "{items:?} accepted");
    }
    // A file whose chunks do not cover it: forged records.
    let mut w = TreeWriter::new(1);
    w.entry(&entry("f", file(10))).expect("entry");
    w.file = None;
    let (last, _) = w.finish().expect("finish");
    assert!(read(&[last.expect("seg")], 16).is_err());
}

proptest! {
    /// Any tree written in walk order reads back identically, however
    /// it was cut into segments, with the same totals.
    #[test]
    fn trees_round_trip(
        names in prop::collection::btree_set("[a-c]{1,3}", 1..30),
        sizes in prop::collection::vec(0u64..200, 30),
        dirs in prop::collection::vec(any::<bool>(), 30),
    ) {
        let mut items: Vec<(Entry, Vec<ChunkRef>)> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            if dirs[i] {
                items.push((entry(n, EntryKind::Dir), vec![]));
                let child = format!("{n}/\u{e9}t\u{e9}");
                items.push((entry(&child, EntryKind::File { size: sizes[i] }), chunks_of(sizes[i], 16)));
            } else {
                items.push((entry(n, EntryKind::File { size: sizes[i] }), chunks_of(sizes[i], 16)));
            }
        }
        items.sort_by(|a, b| walk_order(&a.0.path, &b.0.path));
        let segs = write(&items);
        prop_assert_eq!(read(&segs, 16).expect("read"), items);
    }

    #[test]
    fn junk_segments_are_refused_not_panicked_on(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut raw = MAGIC.to_vec();
        raw.extend_from_slice(&data);
        let stored = zstd::bulk::compress(&raw, 1).expect("zstd");
        let mut r = TreeReader::new(16);
        if r.feed(&stored, "junk").is_ok() {
            while let Ok(Some(_)) = r.next_item() {}
        }
    }
}

#[test]
fn unchanged_stretches_make_identical_segments() {
    let items: Vec<(Entry, Vec<ChunkRef>)> = (0..100_000)
        .map(|i| {
            (
                entry(&format!("f{i:06}"), EntryKind::File { size: 0 }),
                vec![],
            )
        })
        .collect();
    let before = write(&items);
    let mut changed = items.clone();
    changed[75_000].0.mtime_ns += 1;
    let after = write(&changed);
    assert!(before.len() > 2, "{} segments", before.len());
    let same = after
        .iter()
        .filter(|s| before.iter().any(|b| b.id == s.id))
        .count();
    assert!(same + 1 >= after.len(), "{same} of {} reused", after.len());
}

#[test]
fn non_utf8_names_round_trip() {
    let mut e = entry(
        "x",
        EntryKind::Symlink {
            target: vec![0xff, 0xfe],
        },
    );
    e.path = vec![b'n', 0xff, 0x80];
    let segs = write(&[(e.clone(), vec![])]);
    assert_eq!(read(&segs, 16).expect("read"), vec![(e, vec![])]);
}

#[test]
fn hard_links_round_trip_and_must_name_an_earlier_linked_file() {
    let linked = |path: &str| Entry {
        linked: true,
        ..entry(path, EntryKind::File { size: 0 })
    };
    let link = |path: &str, target: &str| {
        entry(
            path,
            EntryKind::Link {
                target: target.as_bytes().to_vec(),
            },
        )
    };
    let good = vec![
        (entry("ck", EntryKind::Dir), vec![]),
        (linked("ck/1.sst"), vec![]),
        (entry("db", EntryKind::Dir), vec![]),
        (link("db/1.sst", "ck/1.sst"), vec![]),
    ];
    let segs = write(&good);
    assert_eq!(read(&segs, 4).expect("read"), good);
    let mut w = TreeWriter::new(1);
    for (e, _) in &good {
        w.entry(e).expect("entry");
    }
    let (_, totals) = w.finish().expect("finish");
    assert_eq!((totals.files, totals.links), (1, 1));

    let bad: Vec<Vec<(Entry, Vec<ChunkRef>)>> = vec![
        // A target that is not flagged as having links.
        vec![
            (entry("a", EntryKind::File { size: 0 }), vec![]),
            (link("b", "a"), vec![]),
        ],
        // A target that comes later, or never.
        vec![(link("a", "b"), vec![]), (linked("b"), vec![])],
        // A target that is a directory or a link.
        vec![
            (entry("a", EntryKind::Dir), vec![]),
            (link("b", "a"), vec![]),
        ],
        vec![
            (linked("a"), vec![]),
            (link("b", "a"), vec![]),
            (link("c", "b"), vec![]),
        ],
        // A target outside the tree.
        vec![(link("a", "../etc/passwd"), vec![])],
        // The file flag on a link.
        vec![
            (linked("a"), vec![]),
            (
                Entry {
                    linked: true,
                    ..link("b", "a")
                },
                vec![],
            ),
        ],
    ];
    for case in bad {
        assert!(read(&write(&case), 4).is_err(), "{case:?}");
    }
}
