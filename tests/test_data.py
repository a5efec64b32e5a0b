"""Loaders of every supported format (files written into tmp_path), iterated k-core filtering, time order
with ties in file order, attribute ids, and the DataError paths (directly and through main())."""
import gzip
import json
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

import HoloMambaRec as H

# One interaction log, written in every format. With min_user_count = min_item_count = 3:
#   pass 1 drops items y (2), w (2), v (1); then users u4 (x, z), u5 (z), u6 (z) fall below 3;
#   pass 2 drops item x (now only u1, u2) and z (no users left); pass 3 changes nothing.
# A single pass would keep x, so the result {u1, u2, u3} x {a, b, c, d}, 12 interactions, needs iteration.
ROWS = [  # (user, item, time) in file order
    ("u1", "a", 10), ("u2", "d", 20), ("u1", "c", 20), ("u1", "d", 20), ("u4", "x", 1), ("u2", "c", 20),
    ("u1", "b", 30), ("u3", "a", 5), ("u1", "x", 5), ("u2", "a", 40), ("u5", "y", 2), ("u2", "b", 10),
    ("u3", "b", 6), ("u4", "y", 3), ("u2", "x", 50), ("u3", "c", 7), ("u5", "z", 3), ("u3", "d", 8),
    ("u4", "z", 4), ("u6", "z", 1), ("u5", "w", 4), ("u6", "w", 2), ("u6", "v", 3),
]
# items a, b, c, d -> ids 1, 2, 3, 4 (sorted raw ids). Per user, by time, ties (time 20) in file order:
EXPECTED_SEQUENCES = [
    [1, 3, 4, 2],  # u1: a@10, c@20, d@20 (c first in the file), b@30
    [2, 4, 3, 1],  # u2: b@10, d@20, c@20 (d first in the file), a@40
    [1, 2, 3, 4],  # u3: a@5, b@6, c@7, d@8
]
# training-split popularity: u1 [a, c], u2 [b, d], u3 [a, b]
EXPECTED_COUNTS = [0, 2, 2, 1, 1]
ML_USER = {f"u{i}": i for i in range(1, 7)}
ML_ITEM = {name: 10 * (i + 1) for i, name in enumerate("abcdxyzwv")}  # numeric order = alphabetical a..d


def cfg_for(dataset, tmp_path, **extra):
    return H.resolve_config({"data_dir": str(tmp_path), "download": False, "min_user_count": 3,
                             "min_item_count": 3, "attribute_mode": "all", **extra}, dataset)


def check_core(data):
    assert (data.n_users, data.n_items, data.n_interactions) == (3, 4, 12)
    assert [s.tolist() for s in data.sequences] == EXPECTED_SEQUENCES
    assert data.item_counts.tolist() == EXPECTED_COUNTS
    assert data.item_attributes[0].abs().sum().item() == 0  # padding row


# ----------------------------------------------------------------------------------------- writers
def write_ml1m(folder, rows=ROWS, movies=None, name="ml-1m.zip"):
    ratings = "".join(f"{ML_USER[u]}::{ML_ITEM[i]}::4::{t}\n" for u, i, t in rows)
    if movies is None:
        movies = (f'{ML_ITEM["a"]}::Amélie "Le Fabuleux Destin" (2001)::A|B\n'
                  f"{ML_ITEM['b']}::Léon, the Professional (1994)::B\n"
                  f"{ML_ITEM['c']}::Crème (1999)::C\n"
                  f"{ML_ITEM['x']}::X (2000)::X|A\n")  # d has no movies.dat entry
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-1m/ratings.dat", ratings.encode("latin-1"))
        zf.writestr("ml-1m/movies.dat", movies.encode("latin-1"))
    return path


def write_beauty(folder, rows=ROWS, drop_field=None):
    folder.mkdir(parents=True, exist_ok=True)
    reviews = []
    for u, i, t in rows:
        r = {"reviewerID": u, "asin": f"i{i}", "reviewerName": "Zoë", "overall": 5.0, "unixReviewTime": t}
        r.pop(drop_field, None)
        reviews.append(json.dumps(r) + "\n")
    with gzip.open(folder / "reviews_Beauty_5.json.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(reviews)
    meta = [
        "{'asin': 'ia', 'title': \"L'Oréal cream\", 'categories': [['Beauty', 'Skin'], ['Beauty', 'Face']]}",
        "{'asin': 'ib', 'categories': [['Beauty', 'Hair']], 'brand': 'Acme', 'price': 3.5}",
        "{'asin': 'id', 'categories': []}",
        "{'asin': 'iq', 'categories': [['Never', 'Reviewed']]}",
        # ic has no metadata line
    ]
    with gzip.open(folder / "meta_Beauty.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(meta) + "\n")
    return folder


def write_csv_dataset(folder, rows=ROWS, attributes=True, columns=("user", "item", "timestamp")):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(columns)).to_csv(folder / "interactions.csv", index=False)
    if attributes:
        (folder / "item_attributes.csv").write_text("item,attributes\na,g1|g2\nb,g2\nc,\nx,g3\n")
    return folder


def write_recbole(folder, name="toy", rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"] + [f"{u}\t{i}\t{float(t)}" for u, i, t in rows]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tcategories:token_seq", "a\tA B", "b\tB", "c\t", "x\tX"]  # d: no row
    (folder / f"{name}.item").write_text("\n".join(items) + "\n")
    return folder / name


# ----------------------------------------------------------------------------------------- k-core
def test_k_core_filter_iterates_to_a_fixed_point():
    df = pd.DataFrame(ROWS, columns=["user", "item", "time"])
    out = H.k_core_filter(df, 3, 3)
    assert sorted(out["user"].unique()) == ["u1", "u2", "u3"]
    assert sorted(out["item"].unique()) == ["a", "b", "c", "d"]
    assert len(out) == 12
    # looser thresholds keep more; zero thresholds keep everything
    assert len(H.k_core_filter(df, 0, 0)) == len(ROWS)
    two = H.k_core_filter(df, 2, 2)  # drops v only, then u6 keeps z, w (2) -> everything else stays
    assert len(two) == len(ROWS) - 1 and "v" not in set(two["item"])


# ----------------------------------------------------------------------------------------- loaders
def test_ml1m_zip(tmp_path):
    write_ml1m(tmp_path)
    data = H.load_dataset(cfg_for("ml-1m", tmp_path))
    check_core(data)
    # vocab in item order: <none> 1, A 2, B 3, C 4; d has no movies.dat entry -> 1
    assert data.n_attributes == 4
    assert data.item_attributes.shape == (5, 8)
    assert data.item_attributes[1:, :2].tolist() == [[2, 3], [3, 0], [4, 0], [1, 0]]
    assert data.item_attributes[:, 2:].abs().sum().item() == 0
    first = H.load_dataset(cfg_for("ml-1m", tmp_path, attribute_mode="first"))
    assert first.item_attributes.tolist() == [[0], [2], [3], [4], [1]]


def test_amazon_beauty_gz(tmp_path):
    write_beauty(tmp_path / "amazon-beauty")  # the data_dir/<name>/ location
    data = H.load_dataset(cfg_for("amazon-beauty", tmp_path))
    check_core(data)
    # ia: Beauty 2, Skin 3, Face 4 (duplicate 'Beauty' once); ib: Beauty, Hair 5, brand:Acme 6;
    # ic: no meta line -> 1; id: empty categories -> 1
    assert data.n_attributes == 6
    assert data.item_attributes[1:, :3].tolist() == [[2, 3, 4], [2, 5, 6], [1, 0, 0], [1, 0, 0]]
    first = H.load_dataset(cfg_for("amazon-beauty", tmp_path, attribute_mode="first"))
    assert first.item_attributes[1:, 0].tolist() == [2, 2, 1, 1] and first.n_attributes == 2


def test_amazon_beauty_modulo_attributes(tmp_path):
    write_beauty(tmp_path)
    data = H.load_dataset(cfg_for("amazon-beauty", tmp_path, attribute_mode="modulo"))
    assert data.n_attributes == 51  # ids 2..51; id 1 stays 'no attribute' in every mode
    assert data.item_attributes[:, 0].tolist() == [0, 3, 4, 5, 6]  # item_id % 50 + 2, row 0 padding


@pytest.mark.parametrize("kind", ["csv", "recbole"])
def test_csv_and_recbole_files(tmp_path, kind):
    """The same items in both formats: a has two attributes, b one, c an empty entry, d none at all.
    csv: a: g1 2, g2 3; b: g2. recbole tokens are field:value: categories:A 2, categories:B 3."""
    spec = (f"csv:{write_csv_dataset(tmp_path / 'mycsv')}" if kind == "csv"
            else f"recbole:{write_recbole(tmp_path / 'rb')}")
    data = H.load_dataset(cfg_for(spec, tmp_path))
    check_core(data)
    assert data.n_attributes == 3
    assert data.item_attributes[1:, :2].tolist() == [[2, 3], [3, 0], [1, 0], [1, 0]]  # c, d -> 1 ('no attribute')
    assert (data.item_attributes[1:, 0] > 0).all()


def test_csv_without_attribute_file(tmp_path):
    folder = write_csv_dataset(tmp_path / "plain", attributes=False)
    data = H.load_dataset(cfg_for(f"csv:{folder}", tmp_path))
    check_core(data)
    assert data.n_attributes == 1 and data.item_attributes[1:, 0].tolist() == [1, 1, 1, 1]


def test_leave_one_out_needs_three_interactions(tmp_path):
    rows = [("p", "a", 1), ("p", "b", 2), ("p", "c", 3), ("q", "a", 1), ("q", "b", 2)]
    folder = write_csv_dataset(tmp_path / "short", rows=rows, attributes=False)
    data = H.load_dataset(cfg_for(f"csv:{folder}", tmp_path, min_user_count=1, min_item_count=1))
    assert (data.n_users, data.n_items, data.n_interactions) == (1, 3, 3)
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3]]


def test_synthetic_is_deterministic_and_attribute_driven():
    df1, attrs1 = H.synthetic_interactions()
    df2, attrs2 = H.synthetic_interactions()
    pd.testing.assert_frame_equal(df1, df2)
    assert attrs1 == attrs2
    assert all(len(v) == 1 for v in attrs1.values()) and len({v[0] for v in attrs1.values()}) == 15


def test_stats_of_loaded_dataset(tmp_path):
    folder = write_csv_dataset(tmp_path / "statcsv")
    data = H.load_dataset(cfg_for(f"csv:{folder}", tmp_path))
    # distinct attribute values of the kept items: g1, g2 (the '<none>' placeholder is not an attribute)
    assert data.stats() == {"dataset": f"csv:{folder}", "users": 3, "items": 4, "interactions": 12,
                            "attributes": 2, "attributes_per_item": 0.75, "items_without_attributes": 0.5,
                            "attribute_fields": 2}


def test_stats_stage_through_main_on_csv(tmp_path, capsys):
    folder = write_csv_dataset(tmp_path / "statmain")
    code = H.main(["--stage=stats", f"--dataset=csv:{folder}", "--min_user_count=3", "--min_item_count=3",
                   f"--results_dir={tmp_path / 'r'}", f"--figures_dir={tmp_path / 'f'}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert json.loads(out[-1]) == {"dataset": f"csv:{folder}", "users": 3, "items": 4, "interactions": 12,
                                   "attributes": 2, "attributes_per_item": 0.75, "items_without_attributes": 0.5,
                                   "attribute_fields": 2}


# ----------------------------------------------------------------------------------------- errors
def corrupt_gzip(path):
    """Flip bytes inside the deflate stream (header intact): decompression fails with zlib.error."""
    blob = bytearray(path.read_bytes())
    for i in range(30, min(len(blob) - 10, 90)):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def error_cases():
    """(name, writer(tmp_path) -> dataset spec, extra config, key phrase of the DataError message)."""
    def truncated_gzip(tmp):
        write_beauty(tmp)
        p = tmp / "reviews_Beauty_5.json.gz"
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
        return "amazon-beauty"

    def truncated_meta_gzip(tmp):
        write_beauty(tmp)
        p = tmp / "meta_Beauty.json.gz"
        p.write_bytes(p.read_bytes()[:-12])
        return "amazon-beauty"

    def corrupt_zip(tmp):
        (tmp / "ml-1m.zip").write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
        return "ml-1m"

    def zip_without_movies(tmp):
        with zipfile.ZipFile(tmp / "ml-1m.zip", "w") as zf:
            zf.writestr("ml-1m/ratings.dat", "1::10::5::1\n")
        return "ml-1m"

    def missing_review_column(tmp):
        write_beauty(tmp, drop_field="unixReviewTime")
        return "amazon-beauty"

    def missing_csv_column(tmp):
        return f"csv:{write_csv_dataset(tmp / 'c', columns=('user', 'product', 'timestamp'))}"

    def missing_recbole_field(tmp):
        (tmp / "bad.inter").write_text("user_id:token\titem_id:token\nu\ti\n")
        return f"recbole:{tmp / 'bad'}"

    def missing_ml1m(tmp):
        return "ml-1m"

    def missing_beauty(tmp):
        write_beauty(tmp)
        (tmp / "meta_Beauty.json.gz").unlink()
        return "amazon-beauty"

    def missing_csv(tmp):
        return f"csv:{tmp / 'nowhere'}"

    def csv_dir_without_interactions(tmp):
        (tmp / "emptydir").mkdir()
        return f"csv:{tmp / 'emptydir'}"

    def missing_recbole(tmp):
        return f"recbole:{tmp / 'nothing'}"

    def empty_after_filtering(tmp):
        return f"csv:{write_csv_dataset(tmp / 'e')}"

    def empty_file(tmp):
        return f"csv:{write_csv_dataset(tmp / 'z', rows=[])}"

    return [
        ("truncated_gzip", truncated_gzip, {}, "unreadable or corrupt"),
        ("truncated_meta_gzip", truncated_meta_gzip, {}, "unreadable or corrupt"),
        ("corrupt_zip", corrupt_zip, {}, "unreadable or corrupt"),
        ("zip_without_movies", zip_without_movies, {}, "unreadable or corrupt"),
        ("missing_review_column", missing_review_column, {}, "lacks the column(s) ['unixReviewTime']"),
        ("missing_csv_column", missing_csv_column, {}, "no item column among ['user', 'product', 'timestamp']"),
        ("missing_recbole_field", missing_recbole_field, {}, "lacks the field(s) ['timestamp']"),
        ("missing_ml1m", missing_ml1m, {}, "ml-1m.zip not found"),
        ("missing_beauty_meta", missing_beauty, {}, "meta_Beauty.json.gz not found"),
        ("missing_csv", missing_csv, {}, "not found: a csv dataset is a folder with interactions.csv"),
        ("csv_dir_without_interactions", csv_dir_without_interactions, {}, "interactions.csv not found"),
        ("missing_recbole", missing_recbole, {}, "nothing.inter not found"),
        ("empty_after_filtering", empty_after_filtering, {"min_user_count": 10}, "no user is left after"),
        ("empty_file", empty_file, {}, "no interactions were read"),
    ]


CASES = error_cases()


@pytest.mark.parametrize("name,writer,extra,phrase", CASES, ids=[c[0] for c in CASES])
def test_data_errors(name, writer, extra, phrase, tmp_path):
    spec = writer(tmp_path)
    with pytest.raises(H.DataError) as info:
        H.load_dataset(cfg_for(spec, tmp_path, **extra))
    assert phrase in str(info.value)
    if name.startswith("missing_") and "column" not in name and "field" not in name and ":" not in spec:
        assert "download is off" in str(info.value)


@pytest.mark.parametrize("name,writer,extra,phrase", CASES, ids=[c[0] for c in CASES])
def test_data_errors_through_main(name, writer, extra, phrase, tmp_path, capsys):
    spec = writer(tmp_path)
    argv = ["--stage=stats", f"--dataset={spec}", f"--data_dir={tmp_path}", "--download=false",
            "--min_user_count=3", "--min_item_count=3", f"--results_dir={tmp_path / 'r'}",
            f"--figures_dir={tmp_path / 'f'}"] + [f"--{k}={v}" for k, v in extra.items()]
    assert H.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert phrase in errors[0]
    assert "Traceback" not in err


def test_corrupt_gzip_payload_raises_data_error(tmp_path):
    """A gzip whose deflate data is damaged (not truncated) fails inside zlib; the loader must still turn it
    into a DataError naming the file."""
    write_beauty(tmp_path)
    path = tmp_path / "reviews_Beauty_5.json.gz"
    corrupt_gzip(path)
    with pytest.raises(zlib.error):  # precondition: the raw failure is a zlib.error
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            fh.read()
    with pytest.raises(H.DataError, match="unreadable or corrupt"):
        H.load_dataset(cfg_for("amazon-beauty", tmp_path))


def test_corrupt_zip_member_raises_data_error(tmp_path):
    """A zip with an intact directory but damaged compressed member data."""
    path = write_ml1m(tmp_path, rows=ROWS * 40)
    blob = bytearray(path.read_bytes())
    for i in range(60, 120):  # inside the first member's deflate data (its local header is 47 bytes)
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(Exception) as raw:  # precondition: reading the member fails
        zipfile.ZipFile(path).read("ml-1m/ratings.dat")
    assert isinstance(raw.value, (zlib.error, zipfile.BadZipFile))
    with pytest.raises(H.DataError, match="unreadable or corrupt"):
        H.load_dataset(cfg_for("ml-1m", tmp_path))


def test_stats_counts_every_modulo_attribute():
    """In modulo mode (paper parity) the attributes are ids 2..51 (item_id % 50 + 2; id 1 stays the
    '<none>' placeholder), so 300 items use 50 distinct attributes."""
    data = H.load_dataset(H.resolve_config({"attribute_mode": "modulo"}, "synthetic"))
    assert data.n_items == 300
    assert data.item_attributes[1:].unique().tolist() == list(range(2, 52))
    assert data.stats()["attributes"] == 50


def test_attribute_selection_drops_uninformative_tokens_and_keeps_fields():
    """Tokens on more than attribute_max_share of the items are dropped ('Beauty' on every item of a real
    Amazon file); 'specific' takes the rarest remaining token; 'name:value' tokens form field 'name', plain
    tokens the field of their position."""
    items = ["a", "b", "c", "d", "e", "f"]
    raw = {"a": ["Beauty", "Makeup", "Lips", "brand:X"], "b": ["Beauty", "Makeup", "Eyes"],
           "c": ["Beauty", "Skin", "brand:X"], "d": ["Beauty", "Makeup", "Lips"], "e": ["Beauty", "Skin"],
           "f": ["Beauty", "Hair"]}
    cfg = H.config("synthetic")
    ids, n, fields, n_fields = H.attribute_table(items, raw, cfg)
    names = {1: "<none>", 2: "Makeup", 3: "Lips", 4: "brand:X", 5: "Eyes", 6: "Skin", 7: "Hair"}
    assert n == 7 and [[names[int(i)] for i in row if i] for row in ids[1:]] == [
        ["Makeup", "Lips", "brand:X"], ["Makeup", "Eyes"], ["Skin", "brand:X"], ["Makeup", "Lips"], ["Skin"], ["Hair"]]
    # fields: '#1' (the second position: Makeup, Skin, Hair), '#2' (the third: Lips, Eyes), 'brand'
    assert fields[1, :3].tolist() == [1, 2, 3] and fields[3, :2].tolist() == [1, 3] and n_fields == 3
    first = H.attribute_table(items, raw, cfg.replace(attribute_mode="first"))[0]
    assert first[1:, 0].tolist() == [2, 2, 3, 2, 3, 4]  # Makeup, Makeup, Skin, Makeup, Skin, Hair
    specific, n_specific = H.attribute_table(items, raw, cfg.replace(attribute_mode="specific"))[:2]
    vocab = {1: "<none>", 2: "Lips", 3: "Eyes", 4: "Skin", 5: "Hair"}
    # the rarest token of each item, ties to the earlier: a Lips (2/6, as brand:X), b Eyes (1/6), c Skin (2/6)
    assert [vocab[int(i)] for i in specific[1:, 0]] == ["Lips", "Eyes", "Skin", "Lips", "Skin", "Hair"]
    assert n_specific == 5
    keep_all = H.attribute_table(items, raw, cfg.replace(attribute_max_share=1.0))[0]
    assert keep_all.gt(0).sum().item() == ids.gt(0).sum().item() + 6  # 'Beauty' back on every item


def test_ml1m_genres_are_one_field(tmp_path):
    write_ml1m(tmp_path)
    data = H.load_dataset(cfg_for("ml-1m", tmp_path))
    real = data.item_attributes > 1  # item d has no movies.dat entry: '<none>'
    assert data.attribute_fields[real].unique().tolist() == [1] and data.stats()["attribute_fields"] == 1


# ----------------------------------------------------------------------------------------- your own data
def own_data(tmp_path, text, name="log.csv", **keys):
    (tmp_path / name).write_text(text)
    return H.load_dataset(f"csv:{tmp_path / name}", min_user_count=1, min_item_count=1, **keys)


def test_column_mapping_tsv_and_date_strings(tmp_path):
    text = "uid\tsku\twhen\n" + "".join(f"u{u}\ts{(u + t) % 4}\t2024-01-0{t + 1} 10:00\n" for u in range(3)
                                         for t in (2, 0, 1))
    data = own_data(tmp_path, text, "log.tsv", columns="uid,sku,when")
    assert (data.n_users, data.n_items, data.n_interactions) == (3, 4, 9)
    # sorted by the parsed dates (not the file order): u0 saw s0 (Jan 1), s1 (Jan 2), s2 (Jan 3)
    assert [data.raw_items[i - 1] for i in data.sequences[0]] == ["s0", "s1", "s2"]
    with pytest.raises(H.DataError, match="has no column 'user_id'"):
        own_data(tmp_path, text, "log.tsv", columns="user_id,sku,when")


def test_names_are_recognised_and_numbers_sort_as_numbers(tmp_path):
    text = "user_id,item_id,ts\n" + "".join(f"a,i{t},{t}\n" for t in (10, 9, 2, 1))
    data = own_data(tmp_path, text)
    assert [data.raw_items[i - 1] for i in data.sequences[0]] == ["i1", "i2", "i9", "i10"]  # 1 < 2 < 9 < 10


@pytest.mark.parametrize("bad,line", [("yesterday", 4), ("", 3)])
def test_a_timestamp_that_is_neither_number_nor_date_names_file_and_line(tmp_path, bad, line):
    rows = ["1", "2", "3", "4"]
    rows[line - 2] = bad
    text = "user,item,timestamp\n" + "".join(f"u,i{k},{t}\n" for k, t in enumerate(rows))
    with pytest.raises(H.DataError, match=f"log.csv, line {line}: timestamp '{bad}' is neither a number nor a date"):
        own_data(tmp_path, text)


def test_no_timestamp_means_file_order_and_duplicates_are_dropped(tmp_path, capsys):
    data = own_data(tmp_path, "user,item\nu,c\nu,a\nu,b\nu,a\n")
    assert [data.raw_items[i - 1] for i in data.sequences[0]] == ["c", "a", "b", "a"]  # file order, repeats kept
    assert data.has_repeats and "no timestamp column, so each user's events are taken in file order" in capsys.readouterr().err
    data = own_data(tmp_path, "user,item,timestamp\nu,a,1\nu,b,2\nu,b,2\nu,c,3\n", "dup.csv")
    assert data.n_interactions == 3 and not data.has_repeats
    assert "dropped 1 duplicate row(s)" in capsys.readouterr().err


def test_recbole_timestamp_that_is_not_a_number_is_an_error(tmp_path):
    lines = ["user_id:token\titem_id:token\ttimestamp:float", "u\ta\t1", "u\tb\tsoon", "u\tc\t3"]
    (tmp_path / "t.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(H.DataError, match="t.inter, line 3: timestamp 'soon'"):
        H.load_dataset(f"recbole:{tmp_path / 't'}", min_user_count=1, min_item_count=1)


def test_prepared_datasets_are_cached_by_file_checksum_and_data_keys(tmp_path, capsys):
    write_ml1m(tmp_path)
    cfg = cfg_for("ml-1m", tmp_path).replace(cache_dir=str(tmp_path / "cache"))
    first = H.load_dataset(cfg)
    (cache,) = (tmp_path / "cache").glob("ml-1m-*.pt")
    again = H.load_dataset(cfg)  # from the cache: the same data, the same fingerprint
    assert again.index.fingerprint == first.index.fingerprint and again.stats() == first.stats()
    assert all(np.array_equal(a, b) for a, b in zip(again.sequences, first.sequences))
    assert torch.equal(again.item_attributes, first.item_attributes) and again.has_repeats == first.has_repeats
    H.load_dataset(cfg.replace(attribute_mode="first"))  # other data keys: another entry
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    cache.write_bytes(b"torn")  # a damaged entry is parsed again, never trusted
    assert H.load_dataset(cfg).index.fingerprint == first.index.fingerprint
    assert "unreadable cache" in capsys.readouterr().err
    write_ml1m(tmp_path, rows=ROWS[:-1])  # other file bytes: another key, so never stale data
    H.load_dataset(cfg)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
