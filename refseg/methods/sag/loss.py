"""SaG's training loss, from (image, expression) pairs alone. Design reasoning: docs/methods/sag.md."""

from typing import Dict

import torch
import torch.nn.functional as F

from refseg.losses import info_nce


def sag_text_loss(
    out: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    w_recon: float = 1.0,
    w_hard: float | None = None,
    w_no_target: float = 0.1,
    w_agree: float = 0.0,
    w_distill: float = 0.0,
    w_distill_neg: float = 0.0,
    distill_temperature: float = 1.0,
    w_word: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """The SaG training loss, from (image, expression) pairs alone.

    out: SaG's dict: text_embedding e (B, D) and gathered g (B, B_img, D),
      both L2-normalised (g[t, j]: sentence t's query gathered from image
      j's slots), logit_scale (), recon_mse (B_img,), no_target_logits (B,),
      hard_negative_weight () (used when ``w_hard`` is None); relevance (B, K)
      over the entities of the sentence's own image (for ``agree``).
    batch: image_index (B,) long, the row of sentence t's own image;
      ref_id (B,) long (hard negatives, agree; without it both are 0);
      no_target (B,) bool, optional.
    Terms (anchors: sentences with a target; a no-target sentence has no
    positive image):
      infonce    InfoNCE over the images of the batch: row t has logits
                 scale * e_t . g[t, j] for every image j, positive = its own
                 image (the paper's loss).
      hard       Sentence-level hard negatives from the same image: row t
                 has the logits scale * e_t . g[t', i] for every sentence t'
                 of t's own image i whose ref_id differs (not no-target),
                 plus the positive scale * e_t . g[t, i]. The candidates are
                 what *other* expressions select from the very image t is
                 about, so no image-level cue separates them: e_t must prefer
                 what its own query selects, and the selection (the slot
                 relevance that the mask is made from) has to differ between
                 expressions with different referents. Sentences of the same
                 ref are neither positive nor negative. Averaged over anchors
                 that have at least one such negative (0 when none has).
      agree      Selection agreement between the expressions of one image: for
                 sentences t, t' of the same image, a = sum_k rel_t,k rel_t',k
                 (the chance both pick the same entity); -log a when they share
                 their ref_id (two descriptions of one object: "the purple
                 hexagon" and "the leftmost hexagon"), -log(1 - a) when not.
                 It acts on the selection itself, so unlike ``hard`` no
                 sentence-specific output can satisfy it; what it reads is
                 the refer format's grouping of expressions into refs, no
                 location. Averaged over such pairs (0 when none; eps 1e-6).
      distill    Selection transfer between the expressions of one image, one
                 way: for sentences t, t' of the same image, t' teaches t when
                 its selection is the sharper one (max_k rel_t',k > max_k
                 rel_t,k); the teacher's relevance, sharpened, T ~ rel_t'^(1/tau)
                 (tau = ``distill_temperature``, 1 = as it is), is detached.
                 Same ref_id: cross-entropy -sum_k T_k log rel_t,k (the
                 easily grounded "the purple hexagon" shows "the leftmost
                 hexagon" which entity it names, so the ordinal or relation
                 words learn from the selection, not from the image-level
                 contrast, which cannot tell the leftmost hexagon from any
                 other: every image with hexagons has one). Another ref_id
                 (``distill_neg``): -log(1 - sum_k T_k rel_t,k), t must not
                 pick what another expression of its image names. Each is
                 averaged over its pairs (0 when none). Unlike ``agree`` the
                 teacher gets no gradient, so the pair cannot meet on a
                 fragment that suits neither; what it reads is the refer
                 format's grouping of expressions into refs, no location.
                 Train with ``group_refs`` so that such pairs share batches.
      word       Text-side hard negatives (present when the model embeds them,
                 SaGHead ``word_negatives`` > 0): for sentence t, the one-word
                 swaps of its expression ("the purple hexagon" -> "the orange
                 hexagon", "leftmost" -> "rightmost"; out["word_negative_embedding"]
                 (M, D) unit, out["word_negative_of"] (M,) the sentence row of
                 each) compete with e_t for what t gathered from its own image:
                 InfoNCE over [scale * e_t . g[t, i], scale * e_n . g[t, i] for
                 t's negatives n]. Where the image holds both hexagons no image
                 cue separates the two sentences; only what t's query selected
                 does, and g[t, i] depends on the query only through that
                 selection (unlike ``hard``, whose candidates are other queries'
                 outputs, so a query-specific output could win). Averaged over
                 anchors that have negatives (0 when none); weight ``w_word``.
      recon      mean slot-decoder reconstruction MSE over the batch's images.
      no_target  BCE of no_target_logits against no_target (calibrates its
                 scale and bias only; the similarity it reads is detached).
      acc_image, acc_hard, acc_word  (logged only) share of anchors whose
                 positive beats every image / hard negative / word negative.
    loss = c * (infonce + w_hard * hard + w_agree * agree + w_distill * distill + w_distill_neg * distill_neg
                + w_word * word + w_no_target * no_target) + w_recon * recon, with
    c = out["contrast_weight"] (0 while the model pre-trains its shatter stage on
    reconstruction alone, see SaGHead ``pretrain_steps``; 1 after, and when absent);
    w_hard None reads out["hard_negative_weight"] (1.0 when absent).
    Returns dict(loss, the terms and accuracies detached).
    """
    e, g = out["text_embedding"], out["gathered"]  # (B, D), (B, B_img, D)
    B, device = e.shape[0], e.device
    scale = out["logit_scale"]
    index = batch["image_index"].to(device).long().view(B)
    rows = torch.arange(B, device=device)
    no_target = batch.get("no_target")
    no_target = torch.zeros(B, dtype=torch.bool, device=device) if no_target is None else no_target.to(device).bool().view(B)
    anchor = ~no_target
    if w_hard is None:
        w_hard = float(out["hard_negative_weight"]) if "hard_negative_weight" in out else 1.0

    logits = scale * torch.einsum("bd,bjd->bj", e, g)  # (B, B_img)
    infonce = info_nce(logits[anchor], index[anchor])
    pos = logits[rows, index]  # (B,)
    acc_image = (pos[anchor] >= logits[anchor].amax(1)).float().mean() if anchor.any() else pos.new_zeros(())

    # hard[t, t'] = scale * e_t . g[t', image of t]
    own = g[:, index]  # (B_t', B_t, D): own[t', t] = g[t', index[t]]
    hard_logits = scale * torch.einsum("td,std->ts", e, own)  # (B_t, B_t')
    same_image = index[:, None] == index[None, :]  # (B, B)
    ref_id = batch.get("ref_id")
    if ref_id is None:
        negative = torch.zeros(B, B, dtype=torch.bool, device=device)
    else:
        ref_id = torch.as_tensor(ref_id).to(device).view(B)
        same_ref = ref_id[:, None] == ref_id[None, :]  # (B, B)
        negative = same_image & ~same_ref & anchor[None, :]
    has_neg = anchor & negative.any(1)  # (B,)
    valid = negative | torch.eye(B, dtype=torch.bool, device=device)  # the diagonal is the positive
    hard = info_nce(hard_logits[has_neg], rows[has_neg], valid[has_neg])
    neg_max = hard_logits.masked_fill(~negative, float("-inf")).amax(1)  # (B,)
    acc_hard = (pos[has_neg] > neg_max[has_neg]).float().mean() if has_neg.any() else pos.new_zeros(())

    agree = distill = distill_neg = e.new_zeros(())
    relevance = out.get("relevance")
    if relevance is not None and ref_id is not None:
        rel = relevance.float()
        both = same_image & anchor[:, None] & anchor[None, :]  # two sentences with a target, one image
        pairs = both & ~torch.eye(B, dtype=torch.bool, device=device)
        if pairs.any():
            same = rel @ rel.T  # (B, B): chance that t and t' pick one entity
            terms = torch.where(same_ref, -torch.log(same + 1e-6), -torch.log((1 - same).clamp(min=0) + 1e-6))
            agree = terms[pairs].mean().to(e.dtype)

        if w_distill or w_distill_neg:
            sharp = rel.detach().amax(1)  # (B,)
            teaches = both & (sharp[None, :] > sharp[:, None])
            teacher = rel.detach() ** (1.0 / distill_temperature)  # sharpened: T ~ rel^(1/tau)
            teacher = teacher / teacher.sum(1, keepdim=True).clamp(min=1e-12)
            one_ref, other_ref = teaches & same_ref, teaches & ~same_ref  # [t, t']: t' teaches t
            if one_ref.any():
                cross = -(torch.log(rel + 1e-6) @ teacher.T)  # [t, t'] = -sum_k T_t',k log rel_t,k
                distill = cross[one_ref].mean().to(e.dtype)
            if other_ref.any():
                overlap = rel @ teacher.T  # [t, t'] = sum_k rel_t,k T_t',k
                distill_neg = -torch.log((1 - overlap[other_ref]).clamp(min=0) + 1e-6).mean().to(e.dtype)

    word, acc_word = e.new_zeros(()), e.new_zeros(())
    if "word_negative_embedding" in out:
        en, of = out["word_negative_embedding"], out["word_negative_of"].to(device).long()  # (M, D), (M,)
        own_g = g[rows, index]  # (B, D): what each sentence gathered from its own image
        mine = (of[None, :] == rows[:, None]) & anchor[:, None]  # (B, M): t's negatives
        has_word = mine.any(1)
        if has_word.any():
            neg_logits = (scale * own_g @ en.T).masked_fill(~mine, float("-inf"))  # (B, M)
            word_logits = torch.cat([pos[:, None], neg_logits], 1)[has_word]  # (A, 1 + M), column 0 the positive
            word = (torch.logsumexp(word_logits, 1) - word_logits[:, 0]).mean()
            acc_word = (word_logits[:, 0] > word_logits[:, 1:].amax(1)).float().mean()

    recon = out["recon_mse"].mean()
    nt = F.binary_cross_entropy_with_logits(out["no_target_logits"], no_target.to(e.dtype))
    contrast = out.get("contrast_weight")  # 0 during the model's shatter pre-training (pretrain_steps)
    contrast = 1.0 if contrast is None else contrast.to(e.dtype)
    loss = contrast * (infonce + w_hard * hard + w_agree * agree + w_distill * distill + w_distill_neg * distill_neg
                       + w_word * word + w_no_target * nt) + w_recon * recon
    parts = {"infonce": infonce, "hard": hard, "agree": agree, "distill": distill, "distill_neg": distill_neg,
             "word": word, "recon": recon, "no_target": nt,
             "acc_image": acc_image, "acc_hard": acc_hard, "acc_word": acc_word}
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}
