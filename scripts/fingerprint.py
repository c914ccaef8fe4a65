"""FNV-1a, 64-bit, as 16 hex digits: the fingerprint our vector scripts
(make-photo-vectors.py, make-real-input-vectors.py) write for byte arrays too large to
commit; the tests compute the same (echomimic-pipeline/tests/common: fnv1a64)."""


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"
