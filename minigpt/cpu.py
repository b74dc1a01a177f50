"""CPU-specific fast paths: the one place they would go, and why none is kept.

Every layer of ``GPT`` is a plain ``nn.Linear`` computed by PyTorch's own kernels.
A trick that pays only on some CPUs belongs here, applied from outside the model
(a context that changes layers for a block and restores them), never inside the
layers a reader studies, and only once a measurement on the machines at hand
shows it faster at one thread and at two.

Two such paths were written and measured, and removed because neither was faster:

- **oneDNN products for training.** Float32 CPU products (the forward pass and
  both products of the backward pass) sent to oneDNN
  (``torch.ops.mkldnn._linear_pointwise``) instead of ``F.linear``'s BLAS, Intel's
  MKL. MKL runs its AVX2 code on AVX-512 CPUs that are not Intel's, where oneDNN,
  which chooses kernels by instruction set, was reported faster. Measured on an
  Intel Xeon with AVX-512 and AMX (where MKL is not handicapped): the training
  step of ``benchmarks/train_step.py`` (both sizes), minigpt with the path on and
  off in the same run, and the forward + backward of single layers of those
  shapes. oneDNN was slower at one thread at both sizes, and not faster at two.
  The AMD figures it was kept for could not be measured here; a path no one can
  measure is not kept.
- **Row-block decoding.** While decoding one sequence with a KV cache, each
  one-row ``F.linear`` on a big weight ran as a ``torch.bmm`` over blocks of the
  weight's rows, to share the matrix-vector product out over the threads.
  Measured on the same machine: ``benchmarks/generate.py`` (GPT-2 124M shape, one
  sequence) with the path on and off, and each of GPT-2's matrices alone with one
  row. MKL's matrix-vector product already uses both threads there, so the blocks
  were slower for every layer's matrix and within noise for the output head.

To measure them again (on another CPU), restore them from the history
(``git log -- minigpt/cpu.py``: the commit "Every GPT layer is a plain nn.Linear;
the oneDNN product moves to minigpt.cpu" has ``accelerated(model)``,
``decoding()``, the ``MINIGPT_CPU_FASTPATH`` switch and their tests) and run, at
``--threads 1`` and ``--threads 2``, twice each::

    python benchmarks/train_step.py --threads 1 --compare-fastpath
    python benchmarks/generate.py --threads 1 --compare-fastpath

Figures belong in the README's benchmark table, with the command that printed them.
"""
