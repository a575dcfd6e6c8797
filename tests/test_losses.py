import math

import pytest
import torch
import torch.nn.functional as F

from layerprune.config import HealConfig
from layerprune.healing import losses
from layerprune.healing.losses import head_kl_loss, joint_loss, kl_loss, mse_loss, topk_kl_loss


class TestKL:
    """kl_loss and topk_kl_loss."""

    def test_kl_matches_a_hand_computation(self):
        # one token, vocabulary of 2: p_T = (0.5, 0.5), p_S = softmax(0, log 3) = (0.25, 0.75)
        teacher = torch.zeros(1, 1, 2)
        student = torch.tensor([[[0.0, math.log(3.0)]]])
        expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
        assert kl_loss(student, teacher, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-6)

    def test_kl_of_identical_logits_is_zero_and_temperature_scales(self):
        logits = torch.randn(2, 3, 7)
        assert kl_loss(logits, logits, torch.ones(2, 3)).item() == pytest.approx(0.0, abs=1e-6)
        s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
        ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum") / 4 * 4
        assert kl_loss(s, t, torch.ones(1, 4), temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)

    def test_topk_kl_equals_full_kl_when_k_covers_the_vocabulary(self):
        s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
        values, indices = t.topk(11, dim=-1)
        full = kl_loss(s, t, torch.ones(2, 3))
        topk = topk_kl_loss(s, values, indices, t.logsumexp(-1), torch.ones(2, 3))
        assert topk.item() == pytest.approx(full.item(), rel=1e-5)

    @pytest.mark.parametrize("bias, temperature", [(False, 1.0), (True, 2.0)])
    def test_head_kl_gives_kl_losss_value_and_gradients_chunk_by_chunk(self, monkeypatch, bias, temperature):
        """From the heads' inputs, in chunks of 7 tokens (a ragged last one), with a masked token:
        the value and the gradients for the state, the head's weight and bias of the whole-logits loss."""
        monkeypatch.setattr(losses, "HEAD_KL_ELEMENTS", 7 * 300)
        torch.manual_seed(0)
        h, teacher_h = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 9, 16)
        head, teacher_head = torch.nn.Linear(16, 300, bias=bias), torch.nn.Linear(16, 300, bias=bias)
        mask = torch.ones(2, 9)
        mask[1, 6:] = 0
        wrt = [h, *head.parameters()]
        expected = kl_loss(head(h), teacher_head(teacher_h), mask, temperature)
        got = head_kl_loss(h, teacher_h, head, teacher_head, mask, temperature)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        for a, b in zip(torch.autograd.grad(expected, wrt), torch.autograd.grad(got, wrt)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)

    def test_head_kl_keeps_no_gradient_where_nothing_needs_one(self):
        h = torch.randn(1, 4, 8)
        head = torch.nn.Linear(8, 50).requires_grad_(False)
        loss = head_kl_loss(h, torch.randn(1, 4, 8), head, head, torch.ones(1, 4))
        assert not loss.requires_grad and loss.item() > 0


class TestMSE:
    """mse_loss in its three scales."""

    def test_mse_matches_a_hand_computation(self):
        a = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
        b = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]])
        # token 1: (1 + 4) / 2 = 2.5; token 2: 16 / 2 = 8; mean 5.25
        assert mse_loss(a, b, torch.ones(1, 2)).item() == pytest.approx(5.25)
        assert mse_loss(a, b, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)

    def test_relative_mse_does_not_depend_on_the_hidden_scale(self):
        s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        raw, rel = mse_loss(s, t, mask), mse_loss(s, t, mask, "relative")
        assert mse_loss(10 * s, 10 * t, mask).item() == pytest.approx(100 * raw.item(), rel=1e-5)
        assert mse_loss(10 * s, 10 * t, mask, "relative").item() == pytest.approx(rel.item(), rel=1e-5)
        assert mse_loss(torch.zeros_like(t), t, mask, "relative").item() == pytest.approx(1.0, rel=1e-6)
        terms = joint_loss(kl_loss(s, t, mask), [s], [t], s, t, mask, HealConfig(mse_scale="relative"))
        assert terms["mse"].item() == pytest.approx(rel.item(), rel=1e-6)

    def test_channel_mse_weighs_every_channel_alike(self):
        """A channel 1000x larger than the rest (a massive activation) dominates raw and relative MSE
        but counts as one channel of eight in the per-channel form."""
        torch.manual_seed(0)
        t = torch.randn(2, 6, 8)
        t[..., 3] *= 1000
        mask = torch.ones(2, 6)
        off_big, off_small = t.clone(), t.clone()
        off_big[..., 3] += 0.1 * t[..., 3]        # 10% error in the massive channel
        off_small[..., 0] += 0.1 * t[..., 0]      # 10% error in an ordinary one
        for scale in ("raw", "relative"):
            assert mse_loss(off_big, t, mask, scale) > 1e4 * mse_loss(off_small, t, mask, scale)
        big, small = mse_loss(off_big, t, mask, "channel"), mse_loss(off_small, t, mask, "channel")
        assert big.item() == pytest.approx(small.item(), rel=1e-4)
        assert big.item() == pytest.approx(0.01 / 8, rel=1e-4)
        assert mse_loss(torch.zeros_like(t), t, mask, "channel").item() == pytest.approx(1.0, rel=1e-5)
        assert mse_loss(10 * off_big, 10 * t, mask, "channel").item() == pytest.approx(big.item(), rel=1e-5)
        masked = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
        wild = off_small.clone()
        wild[0, 3:] = 1e6   # masked tokens change nothing
        assert mse_loss(wild, t, masked, "channel").item() == pytest.approx(
            mse_loss(off_small, t, masked, "channel").item(), rel=1e-5)


class TestJointLoss:
    """joint_loss, the weighted sum of the terms."""

    def test_padding_does_not_change_the_loss(self):
        s, t = torch.randn(1, 5, 9), torch.randn(1, 5, 9)
        hs, ht = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
        mask = torch.tensor([[0, 0, 1, 1, 1]])
        s2, hs2 = s.clone(), hs.clone()
        s2[:, :2], hs2[:, :2] = 1e3, -1e3  # garbage at padded positions
        w = HealConfig()
        a = joint_loss(kl_loss(s, t, mask), [hs], [ht], hs, ht, mask, w)
        b = joint_loss(kl_loss(s2, t, mask), [hs2], [ht], hs2, ht, mask, w)
        for key in a:
            assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6)

    def test_all_masked_batch_gives_zero(self):
        s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
        h = torch.randn(1, 3, 4)
        mask = torch.zeros(1, 3)
        terms = joint_loss(kl_loss(s, t, mask), [h], [h + 1], h, h + 1, mask, HealConfig())
        assert all(v.item() == 0.0 for v in terms.values())

    def test_joint_loss_weights_each_term(self):
        s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
        hs, ht, fs, ft = torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
        mask = torch.ones(1, 3)
        weights = HealConfig(w_kl=0.01, w_mse=2.0, w_final=3.0, mse_scale="raw")
        terms = joint_loss(kl_loss(s, t, mask), [hs], [ht], fs, ft, mask, weights)
        expected = 0.01 * kl_loss(s, t, mask) + 2.0 * mse_loss(hs, ht, mask) + 3.0 * mse_loss(fs, ft, mask)
        assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)










