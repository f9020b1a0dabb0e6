"""SaGConfig: the arguments of ``build_sag`` (encoders and SaGHead), one comment per field."""

from dataclasses import dataclass
from typing import ClassVar, Tuple

from refseg.modeling.build import EncoderConfig


@dataclass
class SaGConfig(EncoderConfig):
    model: ClassVar[str] = "sag"
    levels: Tuple[int, ...] = (16, 32)  # encoder strides grouped into slots and reconstructed (16 required; any of 4, 8, 32 besides)
    dim: int = 128  # width D of tokens, slots and embeddings
    num_slots: int = 16  # K, slots per image
    iters: int = 3  # slot-attention rounds
    heads: int = 4  # heads of the text and slot-context layers (must divide dim)
    mlp_ratio: float = 2.0  # MLP hidden width / D
    text_layers: int = 1  # self-attention layers refining the text tokens
    context_layers: int = 1  # self-attention layers among the slots of an image
    decoder_hidden: int = 128  # hidden width of the slot decoder's MLP
    decoder_depth: int = 2  # hidden layers of the slot decoder's MLP
    logit_scale_init: float = 10.0  # initial InfoNCE inverse temperature (learned, at most 100)
    hard_negatives: float = 0.0  # training: weight of the same-image sentence-level contrast in sag_text_loss (0 = off)
    slot_init: str = "learned"  # slots start as K learned vectors (learned) or mu + sigma * noise (gaussian)
    rgb: bool = False  # also group and reconstruct the mean colour of every grid cell
    rgb_weight: float = 1.0  # weight of the colour reconstruction error in recon_mse
    feature_weight: float = 1.0  # weight of the feature reconstruction error in recon_mse
    detach_slots: bool = False  # no contrastive gradient into the shatter stage
    pretrain_steps: int = 0  # training steps of reconstruction alone before the contrastive terms
    slot_input: str = "features"  # what the slots compete for: features (+ colour with rgb), or rgb (the colour map alone)
    shatter: str = "slots"  # entities: slots (slot attention) or colour (fixed colour regions; needs rgb)
    colour_clusters: int = 16  # k-means clusters of the colour shatter
    grid_stride: int = 16  # the grid the shatter works on: 16, or 8 (needs 8 in levels)
    entity_colour: bool = False  # colour shatter: add a linear term of each entity's mean colour to its slot
    mask_refine: int = 0  # build the mask on a finer colour map of this block size: 0 (off), 8, 4 or 2
    refine_sigma: float = 0.1  # colour scale of the entity shares in the refined mask
    refine_iters: int = 2  # rounds of the refined mask's local colour k-means
    gather: str = "single"  # single (the paper's gather) or relational (location and relation cues)
    relation_tau: float = 0.05  # relational gather: the scale, in image widths, of "left of"
    word_negatives: int = 0  # training: one-word swaps of each expression embedded as text-side negatives (0 = off)
