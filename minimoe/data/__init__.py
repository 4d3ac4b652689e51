"""Data, shared by training and evaluation: where records come from (``sources``: local JSON/JSONL/gzip/Parquet
files and Hub datasets), the multiple-choice row forms of ARC, OpenBookQA, ScienceQA and MMLU (``mc_rows``), and
the fine-tuning data built from them (``dataset``: the papers' record formats, prompt masking, packing and a
batch order that resumes exactly), and the built-in offline tasks tiny-arith and tiny-mix (``builtin``)."""
