"""The second-round WenLan switches with 2 real processes (gloo): the loss of each rank equals the one-process
reference of tests/unit/test_wenlan.py computed here on the gathered rows, for the OpenCLIP block plus a
separate MoCo queue term with recentring, queue positives, the caption teacher and the image self-supervision
term together. Rows share query and image ids across the two ranks, so the gathered ids matter."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from _tiny import ROOT, free_port, set_dist_env

M, D, K, TAU, ALPHA = 3, 4, 7, 0.1, 0.4


def _ref_module():
    spec = importlib.util.spec_from_file_location("_ref_wenlan", os.path.join(ROOT, "tests", "unit", "test_wenlan.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config():
    from pretrain.config import WenLanConfig
    return WenLanConfig(in_batch_block=True, queue_loss="separate", queue_loss_weight=0.7, queue_recenter=True,
                        queue_positives=True, distill_teacher="caption", distill_temperature=0.2,
                        image_ssl_weight=0.5, image_ssl_temperature=0.3)


def _queues():
    from pretrain.wenlan import NegativeQueue
    g = torch.Generator().manual_seed(100)
    iq, tq = NegativeQueue(K, D), NegativeQueue(K, D)
    qids, iids = torch.tensor([1, 8, 4, 9, 6]), torch.tensor([10, 80, 40, 90, 60])  # 5 of 7 slots written
    for q in (iq, tq):
        q.enqueue(F.normalize(torch.randn(5, D, generator=g), dim=-1), qids, iids, step=1)
    return iq, tq


def _local(rank):
    g = torch.Generator().manual_seed(10 + rank)
    unit = lambda: F.normalize(torch.randn(M, D, generator=g), dim=-1)
    qids = torch.tensor([[1, 2, 3], [3, 4, 5]][rank])        # query 3 on both ranks; 1 and 4 also in the queue
    iids = torch.tensor([[10, 20, 30], [30, 40, 55]][rank])  # image 30 on both ranks
    return unit(), unit(), unit(), unit(), qids, iids


def worker(rank, world, port, outdir):
    set_dist_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain.wenlan import gather_keys, wenlan_loss
    qi, qt, ki, kt, qids, iids = _local(rank)
    iq, tq = _queues()
    out = wenlan_loss(_config(), qi, qt, torch.tensor(TAU), 3, ki, kt, gather_keys(ki, kt, qids, iids), iq, tq,
                      qids, iids, distill_alpha=ALPHA)
    torch.save({"loss": float(out["loss"]), "loss_queue": float(out["loss_queue"]),
                "loss_image_ssl": float(out["loss_image_ssl"])}, os.path.join(outdir, f"r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _reference(rank, ref):
    rows = [_local(r) for r in range(2)]
    cat = lambda j: torch.cat([r[j] for r in rows])
    QI, QT, KI, KT, QIDS, IIDS = (cat(j) for j in range(6))
    qi, qt, ki, kt, qids, iids = rows[rank]
    iq, tq = _queues()
    # the text queue recentred on this step's text keys of both ranks, for the caption teacher
    f = tq.features.double().clone()
    teacher_q = type("Q", (), {"features": f - f[:5].mean(0) + KT.double().mean(0)})()
    pos_all = rank * M + torch.arange(M)
    common = dict(alpha=ALPHA, extra_pos=True, recenter=True, key_q=kt, key_queue=teacher_q, teacher_tau=0.2)
    block = (ref.ref_direction(qi, pos_all, QT, tq, qids, iids, QIDS, IIDS, TAU, batch_counts=True, queue_on=False,
                               key_batch=KT, **common)
             + ref.ref_direction(qt, pos_all, QI, iq, qids, iids, QIDS, IIDS, TAU, batch_counts=True, queue_on=False,
                                 key_batch=KT, **common))
    own = torch.arange(M)
    moco = (ref.ref_direction(qi, own, kt, tq, qids, iids, qids, iids, TAU, batch_counts=False, key_batch=kt,
                              recenter_on=KT, **common)
            + ref.ref_direction(qt, own, ki, iq, qids, iids, qids, iids, TAU, batch_counts=False, key_batch=kt,
                                recenter_on=KI, **common))
    ssl = []
    for i in range(M):
        logits = [float(qi[i].double() @ ki[i].double()) / 0.3]
        logits += [float(qi[i].double() @ iq.features[j].double()) / 0.3 for j in range(5)
                   if int(iq.image_ids[j]) != int(iids[i])]
        mx = max(logits)
        ssl.append(mx + math.log(sum(math.exp(x - mx) for x in logits)) - logits[0])
    ssl = float(np.mean(ssl))
    return block + 0.7 * moco + 0.5 * ssl, moco, ssl


def test_second_round_switches_two_processes(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _ref_module()
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt")
        total, moco, ssl = _reference(rank, ref)
        assert got["loss_queue"] == pytest.approx(moco, rel=1e-5)
        assert got["loss_image_ssl"] == pytest.approx(ssl, rel=1e-5)
        assert got["loss"] == pytest.approx(total, rel=1e-5)
