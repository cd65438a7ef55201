"""The plan as SQL, written once and run by both engines (DuckDB locally, Spark SQL on a cluster).

Tables in: ``t_rows`` (``rows.py``: one row per input row) and ``t_images`` (``images.IMAGE_FIELDS``: one
row per distinct image reference, examined once). The statements use only what both dialects share
(``min_by``, window ``row_number``, ``LEAST``/``GREATEST``, explicit casts) and one function of ours,
``shuffle_key(qnorm, sha1)`` (``plan.shuffle_key`` as hex, registered by each engine). Every value a
sample takes from "the first row" is the value at the smallest ``loc`` (input order); these values are
never null (``rows.py`` writes sentinels), so ``min_by`` means the same in both dialects.
"""
from __future__ import annotations

from .options import BuildOptions

# (name, statement): each engine materialises them in this order (DuckDB tables; Spark cached views).
GOOD = """
SELECT r.loc, r.qnorm, r.qlen, r.split_name, r.ref, r.image_path, r.query, r.clicks, r.impressions, r.iid, r.ts,
       i.sha1, i.image_id, i.w, i.h, i.sw, i.sh, i.jpg_size
FROM t_rows r JOIN t_images i ON r.ref = i.ref
WHERE r.reason IS NULL AND i.status = 'ok'
"""

BAD = """
SELECT reason, loc FROM t_rows WHERE reason IS NOT NULL
UNION ALL
SELECT i.status AS reason, r.loc FROM t_rows r JOIN t_images i ON r.ref = i.ref
WHERE r.reason IS NULL AND i.status <> 'ok'
"""

PAIRS = """
SELECT qnorm, sha1, COUNT(*) AS n_rows, CAST(SUM(clicks) AS BIGINT) AS clicks,
       CAST(SUM(impressions) AS BIGINT) AS impressions, MIN(loc) AS first_loc,
       min_by(query, loc) AS query, min_by(ref, loc) AS ref, min_by(image_path, loc) AS image_path,
       min_by(ts, loc) AS ts, MAX(qlen) AS qlen, MAX(split_name) AS split_name, MAX(image_id) AS image_hash,
       MAX(w) AS w, MAX(h) AS h, MAX(sw) AS sw, MAX(sh) AS sh, MAX(jpg_size) AS jpg_size
FROM t_good GROUP BY qnorm, sha1
"""

FILTERED = """
SELECT p.*, CASE
  WHEN clicks < {min_clicks} THEN 'min_clicks'
  WHEN {min_ctr} > 0 AND impressions > 0
       AND CAST(clicks AS DOUBLE) / CAST(impressions AS DOUBLE) < {min_ctr} THEN 'min_ctr'
  WHEN qlen < {min_query_len} THEN 'query_too_short'
  WHEN {max_query_len} > 0 AND qlen > {max_query_len} THEN 'query_too_long'
  WHEN LEAST(w, h) < {min_image_side} THEN 'image_too_small'
  WHEN {max_aspect} > 0
       AND CAST(GREATEST(w, h) AS DOUBLE) / CAST(GREATEST(1, LEAST(w, h)) AS DOUBLE) > {max_aspect} THEN 'aspect_ratio'
  END AS reason
FROM t_pairs p
"""

QUERY_IDS = "SELECT qnorm, min_by(qid, loc) AS qid FROM t_rows WHERE reason IS NULL AND qid IS NOT NULL GROUP BY qnorm"
IMAGE_IDS = "SELECT sha1, min_by(iid, loc) AS iid FROM t_good WHERE iid IS NOT NULL GROUP BY sha1"

# Small results (read into the driver)
BAD_COUNTS = "SELECT reason, COUNT(*) FROM t_bad GROUP BY reason"
BAD_FIRST = """
SELECT reason, loc FROM (
  SELECT reason, loc, row_number() OVER (PARTITION BY reason ORDER BY loc) AS n FROM t_bad) t
WHERE n <= {first_n}
"""
PAIR_COUNTS = """
SELECT reason, COUNT(*), CAST(SUM(n_rows) AS BIGINT), CAST(SUM(n_rows - 1) AS BIGINT) FROM t_pairs_f GROUP BY reason
"""
# The first rows of a filter reason lie in the pairs with the smallest first rows: join only those.
FILTERED_FIRST = """
SELECT reason, loc FROM (
  SELECT top.reason, g.loc, row_number() OVER (PARTITION BY top.reason ORDER BY g.loc) AS n
  FROM t_good g JOIN (
    SELECT reason, qnorm, sha1 FROM (
      SELECT reason, qnorm, sha1, row_number() OVER (PARTITION BY reason ORDER BY first_loc) AS n
      FROM t_pairs_f WHERE reason IS NOT NULL) t0
    WHERE n <= {first_n}) top
  ON g.qnorm = top.qnorm AND g.sha1 = top.sha1) t
WHERE n <= {first_n}
"""
IMAGE_COUNTS = """
SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), 0), COUNT(DISTINCT sha1),
       COALESCE(SUM(encoded), 0)
FROM t_images
"""
DISTINCT_REFS = "SELECT DISTINCT ref FROM t_rows WHERE reason IS NULL"

# The kept pairs in shuffle order, streamed to ``plan.describe`` (which numbers, splits and cuts shards).
KEPT_COLUMNS = ("qnorm", "sha1", "n_rows", "clicks", "impressions", "first_loc", "query", "ref", "image_path", "ts",
                "split_name", "image_hash", "w", "h", "sw", "sh", "jpg_size", "qid", "iid")
KEPT = """
SELECT p.qnorm, p.sha1, p.n_rows, p.clicks, p.impressions, p.first_loc, p.query, p.ref, p.image_path, p.ts,
       p.split_name, p.image_hash, p.w, p.h, p.sw, p.sh, p.jpg_size, q.qid, i.iid
FROM t_pairs_f p LEFT JOIN t_qids q ON p.qnorm = q.qnorm LEFT JOIN t_iids i ON p.sha1 = i.sha1
WHERE p.reason IS NULL
ORDER BY shuffle_key(p.qnorm, p.sha1), p.qnorm, p.sha1
"""


def _num(x) -> str:
    return f"CAST({float(x)!r} AS DOUBLE)" if isinstance(x, float) else str(int(x))


def tables(options: BuildOptions):
    """The derived tables of a plan, in order: [(name, statement)]."""
    o = options
    return [("t_good", GOOD), ("t_bad", BAD), ("t_pairs", PAIRS),
            ("t_pairs_f", FILTERED.format(min_clicks=_num(o.min_clicks), min_ctr=_num(float(o.min_ctr)),
                                          min_query_len=_num(o.min_query_len), max_query_len=_num(o.max_query_len),
                                          min_image_side=_num(o.min_image_side),
                                          max_aspect=_num(float(o.max_aspect_ratio)))),
            ("t_qids", QUERY_IDS), ("t_iids", IMAGE_IDS)]
