"""RFC 9162 trees against independent vectors: transparency-dev/merkle and sum.golang.org."""

from __future__ import annotations

import base64

import pytest

from trustplane.trust.checkpoint import open_checkpoint, parse_verifier_key
from trustplane.trust.merkle import (
    EMPTY_ROOT,
    MemoryNodeStore,
    TreeState,
    append,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_of,
    verify_consistency,
    verify_inclusion,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# transparency-dev/merkle, testonly/constants.go: LeafInputs(), the RFC 6962
# test leaves; NodeHashes() indexed [level][index]; RootHashes() by tree size
# 0..8; CompactTrees() the frontier hashes for each size.
LEAF_INPUTS = [
    h(""),
    h("00"),
    h("10"),
    h("2021"),
    h("3031"),
    h("40414243"),
    h("5051525354555657"),
    h("606162636465666768696a6b6c6d6e6f"),
]
NODE_HASHES = [
    [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7"),
        h("07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"),
    ],
    [
        h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
    ],
    [
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ],
    [h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")],
]
ROOT_HASHES = [
    h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
NH = NODE_HASHES
COMPACT_TREES: list[list[bytes]] = [
    [],
    [NH[0][0]],
    [NH[1][0]],
    [NH[1][0], NH[0][2]],
    [NH[2][0]],
    [NH[2][0], NH[0][4]],
    [NH[2][0], NH[1][2]],
    [NH[2][0], NH[1][2], NH[0][6]],
    [NH[3][0]],
]

# transparency-dev/merkle, proof/verify_test.go: inclusionProofs and
# consistencyProofs. The Go table counts leaves from 1; here the index is 0-based.
INCLUSION_VECTORS: list[tuple[int, int, list[bytes]]] = [
    (0, 1, []),
    (
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]
CONSISTENCY_VECTORS: list[tuple[int, int, list[bytes]]] = [
    (1, 1, []),
    (
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]
# proof/verify_test.go: sha256SomeHash, a 32-byte value that is no tree's hash.
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")

LEAF_HASHES = [leaf_hash(d) for d in LEAF_INPUTS]


def full_store() -> MemoryNodeStore:
    store = MemoryNodeStore()
    _, nodes = append(TreeState(), LEAF_HASHES)
    store.put_nodes(nodes)
    return store


def test_hashes_and_roots_match_transparency_dev() -> None:
    assert h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == EMPTY_ROOT
    assert NODE_HASHES[0] == LEAF_HASHES
    assert node_hash(NH[0][0], NH[0][1]) == NH[1][0]
    for size, want in enumerate(ROOT_HASHES):
        assert root_of(LEAF_HASHES[:size]) == want


def test_append_one_at_a_time_yields_the_compact_trees_and_roots() -> None:
    state = TreeState()
    assert list(state.frontier) == COMPACT_TREES[0]
    for size in range(1, 9):
        state, _ = append(state, LEAF_HASHES[size - 1 : size])
        assert list(state.frontier) == COMPACT_TREES[size]
        assert root(state) == ROOT_HASHES[size]


def test_append_hands_out_exactly_the_node_hashes_of_the_vectors() -> None:
    _, nodes = append(TreeState(), LEAF_HASHES)
    expected = {
        (level, index, value)
        for level, row in enumerate(NODE_HASHES)
        for index, value in enumerate(row)
    }
    assert set(nodes) == expected
    assert len(nodes) == len(expected)


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
def test_inclusion_vectors_are_produced_and_verified(
    index: int, size: int, proof: list[bytes]
) -> None:
    assert inclusion_proof(full_store(), index, size) == proof
    assert verify_inclusion(LEAF_HASHES[index], index, size, proof, ROOT_HASHES[size])


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY_VECTORS)
def test_consistency_vectors_are_produced_and_verified(
    old: int, new: int, proof: list[bytes]
) -> None:
    assert consistency_proof(full_store(), old, new) == proof
    assert verify_consistency(old, new, ROOT_HASHES[old], ROOT_HASHES[new], proof)


def inclusion_probes(
    index: int, size: int, proof: list[bytes], root_hash: bytes, leaf: bytes
) -> list[tuple[str, int, int, list[bytes], bytes, bytes]]:
    """proof/verify_test.go corruptInclusionProof: every probe must fail."""
    probes = [
        ("index - 1", index - 1, size, proof, root_hash, leaf),
        ("index + 1", index + 1, size, proof, root_hash, leaf),
        ("index ^ 2", index ^ 2, size, proof, root_hash, leaf),
        ("size * 2", index, size * 2, proof, root_hash, leaf),
        ("size // 2", index, size // 2, proof, root_hash, leaf),
        ("wrong leaf", index, size, proof, root_hash, b"WrongLeaf"),
        ("empty root", index, size, proof, EMPTY_ROOT, leaf),
        ("random root", index, size, proof, SOME_HASH, leaf),
        ("trailing garbage", index, size, [*proof, b""], root_hash, leaf),
        ("trailing root", index, size, [*proof, root_hash], root_hash, leaf),
        ("preceding garbage", index, size, [b"", *proof], root_hash, leaf),
        ("preceding root", index, size, [root_hash, *proof], root_hash, leaf),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 8]) + wrong[i][1:]
        probes.append((f"modified proof[{i}] bit 3", index, size, wrong, root_hash, leaf))
    if proof:
        probes.append(("removed component", index, size, proof[:-1], root_hash, leaf))
    if len(proof) > 1:
        inserted = [proof[0], SOME_HASH, *proof[1:]]
        probes.append(("inserted component", index, size, inserted, root_hash, leaf))
    return probes


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
def test_corrupted_inclusion_proofs_fail(index: int, size: int, proof: list[bytes]) -> None:
    probes = inclusion_probes(index, size, proof, ROOT_HASHES[size], LEAF_HASHES[index])
    passed = [p[0] for p in probes if verify_inclusion(p[5], p[1], p[2], p[3], p[4])]
    assert passed == []


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY_VECTORS[1:])
def test_corrupted_consistency_proofs_fail(old: int, new: int, proof: list[bytes]) -> None:
    """proof/verify_test.go corruptConsistencyProof: every probe must fail."""
    r1, r2 = ROOT_HASHES[old], ROOT_HASHES[new]
    probes = [
        ("old - 1", old - 1, new, r1, r2, proof),
        ("old + 1", old + 1, new, r1, r2, proof),
        ("old ^ 2", old ^ 2, new, r1, r2, proof),
        ("new * 2", old, new * 2, r1, r2, proof),
        ("new // 2", old, new // 2, r1, r2, proof),
        ("wrong root1", old, new, b"WrongRoot", r2, proof),
        ("wrong root2", old, new, r1, b"WrongRoot", proof),
        ("swapped roots", old, new, r2, r1, proof),
        ("empty proof", old, new, r1, r2, []),
        ("trailing garbage", old, new, r1, r2, [*proof, b""]),
        ("trailing root1", old, new, r1, r2, [*proof, r1]),
        ("trailing root2", old, new, r1, r2, [*proof, r2]),
        ("preceding garbage", old, new, r1, r2, [b"", *proof]),
        ("preceding root1", old, new, r1, r2, [r1, *proof]),
        ("preceding root2", old, new, r1, r2, [r2, *proof]),
        ("preceding proof[0]", old, new, r1, r2, [proof[0], *proof]),
        ("truncated proof", old, new, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 16]) + wrong[i][1:]
        probes.append((f"modified proof[{i}] bit 4", old, new, r1, r2, wrong))
    passed = [p[0] for p in probes if verify_consistency(p[1], p[2], p[3], p[4], p[5])]
    assert passed == []


def test_inclusion_edge_cases_of_transparency_dev() -> None:
    """proof/verify_test.go TestVerifyInclusionSingleEntry and TestVerifyInclusion."""
    single = leaf_hash(b"data")
    assert verify_inclusion(single, 0, 1, [], single)
    assert not verify_inclusion(b"", 0, 1, [], single)
    assert not verify_inclusion(single, 0, 1, [], b"")
    assert not verify_inclusion(b"", 0, 1, [], b"")
    for index, size in [(0, 0), (0, 1), (1, 0), (2, 1)]:
        assert not verify_inclusion(SOME_HASH, index, size, [], b"")
        assert not verify_inclusion(b"", index, size, [], EMPTY_ROOT)
        assert not verify_inclusion(SOME_HASH, index, size, [], EMPTY_ROOT)


def test_consistency_edge_cases_of_transparency_dev() -> None:
    """proof/verify_test.go TestVerifyConsistency, with 32-byte stand-in roots.

    Go's "don't care" roots are short strings, which this verifier refuses
    outright, and Go accepts any old root for size 0; here the old root of an
    empty tree must be EMPTY_ROOT (the only root a size-0 checkpoint can carry).
    """
    r1, r2 = leaf_hash(b"don't care 1"), leaf_hash(b"don't care 2")
    cases = [
        (0, 0, r1, r2, [], False),
        (1, 1, r1, r2, [], False),
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
        (0, 1, EMPTY_ROOT, r2, [], True),
        (1, 1, r2, r2, [], True),
        (1, 0, r1, r2, [], False),
        (2, 1, r1, r2, [], False),
        (1, 2, r1, r2, [], False),
        (0, 0, EMPTY_ROOT, r2, [], False),
        (1, 1, EMPTY_ROOT, r2, [], False),
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
        (0, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
        (1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
        # Where this verifier is stricter than Go: size 0 with another root.
        (0, 1, r1, r2, [], False),
        (0, 0, r1, r1, [], False),
    ]
    for old, new, root1, root2, proof, want in cases:
        assert verify_consistency(old, new, root1, root2, proof) is want, (old, new)


# sum.golang.org, through transparency-dev/incubator cmd/tlog-verify/testdata/
# go.sum-database-tree-43930254.tlog-proof (a c2sp.org/tlog-proof@v1 file) and
# its .raw leaf: a real inclusion proof in a 58-million-leaf production log,
# under a checkpoint signed by the key the go command ships with.
SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_LEAF = (
    b"github.com/transparency-dev/tessera v1.0.0 "
    b"h1:4OT1V9xJLa5NnYlFWWlCdZkCm18/o12rdd+bCTje7XE=\n"
    b"github.com/transparency-dev/tessera v1.0.0/go.mod "
    b"h1:TLvfjlkbmsmKVEJUtzO2eb9Q2IBnK3EJ0dI4G0oxEOU=\n"
)
SUMDB_INDEX = 43930254
SUMDB_PROOF = [
    base64.b64decode(line)
    for line in [
        "Q2cuq1e21q4UC1RQ6wtmXmCxk2q3Wqz/yFvD12P2KSM=",
        "VdgHwjNYSv9fZVxvYzn8kySGvrjqeCnzdJqJILieWf4=",
        "ARfBpZjsj3LSP42V4xBVdCKbHVa4WXSbuFAa0rUSCVQ=",
        "0VYgz0Vmgz6jOM8H6edZBWHtO6+R7tPvN4EOwwRRSws=",
        "vq+ifloynXE+ORFC1wymQT0cpNIJA1tqg2mQpA55+kc=",
        "SCRewH6vHE1/Vwkt5yEW8xT7il0WbWltXjFIVqlGtQQ=",
        "p//fIG8jgZie4MMwjHF7quCIJ4hErr7U4at0HV34MZQ=",
        "D3K5YdBlxQcklrgF8vSbDyT05J5/mA9lzuhhp72uSOk=",
        "jeYlYyH9FhYGwu+ZJmfPr8GvSNdgrydwqmJgHsygoR0=",
        "p6RFgfGhu8Uuy0LyyZdI4MrSPOZkMe+ycwWJFfr8zTI=",
        "AMZsxrVKBPSe8nSNVVCTyTxWns0CiNbChG/FoiSJWuM=",
        "e+rtSmK5Pd1K5LgFwj7VSo5XJXOcq7OOcqPVZn1hqeM=",
        "expmv1e6XiGr5NMUjMRkSZijlcBx+fZcpqQmUnawhOY=",
        "+Wuic0YARH84k80/Q+KJIbhRCldxG8npjLFiHMLtEpo=",
        "NOMeJqlyUxFXUKYRI/1YqAF4WJBfXJr8UM/SlWGqxgY=",
        "Lm6+TAlLb2lvUs/3unZ2t6RSmJw8RO+WuEuUbAw3QEc=",
        "Jhh2EDG15gDBoLmLiF88lVTgd+uvx3L0xczb8Y3kSq8=",
        "taenaiKqtYMXS3gDzIF3q8VZzqAXqftHqL9BC39njaw=",
        "kZNKypGwEANnt1+msLINnqrIrwX+0MGZUTTKXTfbloI=",
        "A4NJSymjVJ5dvGPaGC3Gj04x8qVRKYfh0pP24mwd6Yk=",
        "KQq808D9W4NUgr4ip+rF/RCyAUERYKKCwKiiAJfaFOc=",
        "I3EVN3zM2rDjs5Q06Zr5gxhg+ksnX2h77E75uL+h3aI=",
        "7iNSYSDhMeRkeV7r9krKbKelNPiqDCJU1i6xAn/Fbuw=",
        "MYqdo6zSjxaAn+29EEjNRbPYm0myB3bheu+HTZIAbVY=",
        "S7olT9TPLXk+bbawbV3sAzWMmhcpWrtjbw++9ZTiyn8=",
        "xJ20xXM4QItt5vxFOtolZ5l18p7ej1+RimNkgWmoRFM=",
    ]
]
SUMDB_CHECKPOINT = (
    "go.sum database tree\n"
    "58253265\n"
    "lIyLAEe4zJUQAda6pFFg3yPOf7j1SgfMEDrpgoX39JU=\n"
    "\n"
    "— sum.golang.org Az3grkvBHbFcpEFQ3BhGlktgB7pcswIW+ez91eWY6rNPtWfAey8bJO2rVoG2yO5zXvgi"
    "aikWVHqon+e14JhA+WXvpAY=\n"
).encode()


def test_real_sumdb_inclusion_proof_verifies() -> None:
    leaf = leaf_hash(SUMDB_LEAF)
    # cmd/tlog-verify/main_test.go testLeafHashHex
    assert leaf == h("0fa57c511c3b2ffcc0a05ad63172568d265aaf9844e9b636a0978795396f2ab1")
    checkpoint = open_checkpoint(
        SUMDB_CHECKPOINT, parse_verifier_key(SUMDB_KEY), "go.sum database tree"
    )
    assert checkpoint.size == 58253265
    assert verify_inclusion(leaf, SUMDB_INDEX, checkpoint.size, SUMDB_PROOF, checkpoint.root)
    probes = inclusion_probes(SUMDB_INDEX, checkpoint.size, SUMDB_PROOF, checkpoint.root, leaf)
    passed = [p[0] for p in probes if verify_inclusion(p[5], p[1], p[2], p[3], p[4])]
    assert passed == []
