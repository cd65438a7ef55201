#!/usr/bin/env python
"""Train a WordPiece tokenizer on the queries of a click log's shards (for text towers trained from scratch).

    python tools/build_tokenizer.py data/demo/shards/train --out data/demo/tokenizer [--vocab-size 8000]

Why: English tokenizers (e.g. the MiniLM one) map most Chinese characters to [UNK], so a tower trained
from scratch on Chinese queries cannot tell 红 from 绿. This tool reads every ``KEY.txt`` of the given
shards (folders, globs or brace patterns, as the loader takes them), and trains a BERT-style WordPiece
vocabulary: NFKC-normalised, lower-cased, every CJK character its own token (as BERT's basic tokenizer
splits them), Latin words split into word pieces. The result is saved with ``save_pretrained`` and is
loaded by ``model.text.tokenizer: <dir>``; with ``model.text.pretrained: false`` the tower's vocabulary
size follows the tokenizer.
"""
import argparse
import os
import sys
import tarfile
import time



def iter_queries(spec: str):
    from pretrain.data import expand_urls, open_shard

    for urls, _ in expand_urls(spec):
        for url in urls:
            with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        data = tar.extractfile(member).read()
                        try:
                            text = data.decode("utf-8").strip()
                        except UnicodeDecodeError:
                            continue
                        if text:
                            yield text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="training shards (folders, globs, brace patterns, fsspec URLs)")
    p.add_argument("--out", required=True, help="directory to write the tokenizer to")
    p.add_argument("--vocab-size", type=int, default=8000, help="largest vocabulary (default 8000)")
    p.add_argument("--min-frequency", type=int, default=1, help="drop pieces seen fewer times (default 1)")
    args = p.parse_args(argv)
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    queries = [q for spec in args.shards for q in iter_queries(spec)]
    if not queries:
        print(f"error: no query text (.txt members) found in {args.shards}", file=sys.stderr)
        return 2
    wp = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    wp.train_from_iterator(queries, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    from tokenizers.processors import BertProcessing
    wp._tokenizer.post_processor = BertProcessing(("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]")))
    os.makedirs(args.out, exist_ok=True)
    wp.save_model(args.out)  # vocab.txt, for tools that read a plain BERT vocabulary
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(args.out)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.out)  # what the trainer will load
    unk = sum(t == "[UNK]" for q in queries[:2000] for t in tok.tokenize(q))
    print(f"[build_tokenizer] {len(queries)} queries -> vocabulary of {len(tok)} in {args.out} "
          f"({unk} [UNK] tokens in the first {min(len(queries), 2000)} queries), {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
