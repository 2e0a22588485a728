"""The written schema of a cell result (``results/<suite>/cells/<id>.json``).

Every key, what it holds and its unit::

    schema            int   version of this schema
    cell_id           str   content hash of ``config`` (harness/run/cells.py)
    suite             str   suite name
    status            str   "ok" or "failed"
    error             dict  {type, message, traceback} when failed, else null
    model             dict  id, fingerprint (sha256), files {name: sha256}, note
                            (e.g. "4-bit quantized, de-quantized on load"), dtype
    method            dict  name, label, options, needs (calibration statistics); null for the baseline
    allocator         dict  name, label, options; null for the baseline
    target            dict  kind (params|rank|bytes|bits), value, label; null for the baseline
    surgery           dict  kinds, lm_head, mode (factored|dense)
    calibration       dict  source, samples, seqlen, ..., data (sha256 of the text) or null
    ranks             dict  layer name -> rank kept (null: layer left dense)
    metrics           dict  metric name -> number; accuracies are fractions in [0, 1],
                            perplexity is per token, sizes are counts and bytes
    higher_is_better  dict  metric name -> bool
    hardware_metrics  list  metric names from hardware-bound profilers (latency, memory, energy):
                            comparable only between cells on the same hardware
    evaluations       dict  evaluator/profiler label -> info: data source and split,
                            examples used, sequence length, units, raw samples
    sizes             dict  dense_decomposable_params/bytes (uncompressed), model_params/bytes (as evaluated)
    timing            dict  seconds: factorize_s (the method's one factorization of every
                            group, shared by its cells), allocate_s, <component>_s, cell_s
    factorization_info dict group -> diagnostics (iterations, jitter, relative error)
    artifacts         list  files beside the results (relative to the suite's results dir):
                            ranks/<cell id>.csv and .png (rank chosen for every matrix)
    provenance        dict  seed, seeding, torch_deterministic, suite_file and suite_sha256,
                            suite (the resolved suite), model_files {name: sha256},
                            data {evaluators: {label: fingerprints, e.g. task -> file sha256},
                            texts: {calibration|label: source, split, note, text_sha256,
                            files {path: sha256}}}, command, limit, harness and plugin
                            versions, libraries, hardware, git revision, created (UTC)
    config            dict  the resolved cell config that ``cell_id`` hashes
"""

SCHEMA_VERSION = 1
