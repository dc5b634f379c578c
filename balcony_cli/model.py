"""The Balcony model: a frozen base with one extra decoder layer and norm per exit, sharing the LM head."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.utils import ModelOutput

from balcony_cli.architectures import Layout, layout_for
from balcony_cli.distill import distillation_losses, hidden_state_losses
from balcony_cli.errors import BadInputError

from balcony_cli.exits import INIT_CHOICES, Init, parse_exits  # noqa: F401 (re-exported)


@dataclass
class BalconyTrainingOutput(ModelOutput):
    """Hidden states from one pass of the base with every exit attached (before the LM head).

    Shapes are (batch, sequence, hidden). Logits are left to the caller, which applies the shared head
    in chunks of tokens so that no full-vocabulary tensor exists for every exit at once.
    """

    full_hidden: torch.Tensor | None = None
    """The base's last hidden state after its final norm (the teacher)."""
    exit_hidden: dict[int, torch.Tensor] | None = None
    """Exit k's hidden state after Balcony layer k and exit norm k."""
    naive_hidden: dict[int, torch.Tensor] | None = None
    """Layer k's output after the base's final norm: the untrained early exit, when requested."""
    losses: torch.Tensor | None = None
    """Each exit's training loss, shape (num_exits,), when a loss temperature is given: its mean
    KL(full || exit), plus hidden_loss_weight times its hidden-state MSE."""
    kl: torch.Tensor | None = None
    """Each exit's mean KL(full || exit) at the loss temperature, shape (num_exits,)."""
    hidden_mse: torch.Tensor | None = None
    """Each exit's mean squared error against the full model's final hidden state, shape (num_exits,),
    when hidden_loss_weight is positive."""


class BalconyModel(nn.Module):
    """A frozen base causal LM with a Balcony layer and an exit norm after each chosen layer.

    `forward(input_ids, exit=k)` and `generate(..., exit=k)` run exit k as an ordinary model of the
    base's own class with k + 1 layers. That model is a view: it shares every module with the base
    and the Balcony layer, so switching exits copies no weights.

    Initialisations: "copy-last" copies the base's last layer and takes the input norm of layer k + 1
    as the exit norm. "copy-next" copies layer k + 1, the layer whose position the Balcony layer
    takes, with the same exit norm. "fit" starts as copy-last with a copy of the base's final norm,
    and `balcony_cli.init_fit.fit_exits` then corrects the MLP output projection on calibration text;
    without that call it is only a starting point. "random" uses the base's own weight initialiser.
    """

    def __init__(self, base: nn.Module, exits: Iterable[int], init: Init = "copy-last", seed: int = 0):
        super().__init__()
        self.layout: Layout = layout_for(base.config)
        self.base = base
        self.base.eval()
        self.base.requires_grad_(False)
        self.num_layers = len(self.layout.layers(base))
        self.exits = parse_exits(list(exits), self.num_layers)
        if init not in INIT_CHOICES:
            raise BadInputError(f"--init {init!r}: expected one of {', '.join(INIT_CHOICES)}")
        self.init = init

        base_layers = self.layout.layers(base)
        layer_class = type(base_layers[-1])
        reference_param = next(base.parameters())
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        exit_layers, exit_norms = {}, {}
        for k in self.exits:
            # A fresh layer built for slot k, so that its attention type (sliding or full) and its
            # KV-cache index match the position it takes in the exit-k model.
            layer = layer_class(base.config, layer_idx=k)
            norm = copy.deepcopy(self.layout.layer_input_norm(base_layers[k]))
            if init in ("copy-last", "fit"):
                layer.load_state_dict(base_layers[-1].state_dict())
            elif init == "copy-next":
                # base_layers is 0-based, so base_layers[k] is layer k + 1.
                layer.load_state_dict(base_layers[k].state_dict())
            else:
                with torch.no_grad():
                    layer.apply(base._init_weights)
                    norm.apply(base._init_weights)
            if init == "fit":
                # The fit pulls the Balcony layer's output towards the base's last residual state, which
                # the base's final norm expects.
                norm = copy.deepcopy(self.layout.final_norm(base))
            self.layout.set_layer_index(layer, k)
            exit_layers[str(k)] = layer.to(device=reference_param.device, dtype=reference_param.dtype)
            exit_norms[str(k)] = norm.to(device=reference_param.device, dtype=reference_param.dtype)
        torch.random.set_rng_state(generator_state)

        self.exit_layers = nn.ModuleDict(exit_layers)
        self.exit_norms = nn.ModuleDict(exit_norms)
        # The norm copies inherit requires_grad=False from the frozen base.
        self.exit_layers.requires_grad_(True)
        self.exit_norms.requires_grad_(True)
        # Like transformers' from_pretrained, start in eval mode; the trainer switches to train mode.
        self.eval()
        # Views are plain attributes, not submodules, so that state_dict() and parameters() see each
        # module once.
        self.__dict__["_views"] = {}

    # Parameters and state.

    def balcony_state_dict(self) -> dict[str, torch.Tensor]:
        """Return only the Balcony parameters, keyed "exit_layers.K...." and "exit_norms.K...."."""
        state = {}
        for prefix, module in (("exit_layers", self.exit_layers), ("exit_norms", self.exit_norms)):
            for name, tensor in module.state_dict().items():
                state[f"{prefix}.{name}"] = tensor
        return state

    def load_balcony_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.balcony_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise BadInputError(
                "Balcony weights do not match the exits in balcony_config.json "
                f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}); the checkpoint is inconsistent"
            )
        for prefix, module in (("exit_layers", self.exit_layers), ("exit_norms", self.exit_norms)):
            sub = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub)

    def balcony_parameters(self) -> list[nn.Parameter]:
        return [*self.exit_layers.parameters(), *self.exit_norms.parameters()]

    def train(self, mode: bool = True) -> BalconyModel:
        # The base stays in eval mode: it is the frozen teacher, and its dropout must not fire.
        super().train(mode)
        self.base.eval()
        return self

    @property
    def config(self):
        return self.base.config

    @property
    def head(self) -> nn.Module:
        return self.layout.head(self.base)

    # Single-exit inference.

    def exit_model(self, exit: int | None) -> nn.Module:
        """Return the model that runs exit `exit` (or the full base for None or the last layer).

        The result is an instance of the base's class, sharing modules with it, with layers
        1..k, Balcony layer k as layer k + 1, and exit norm k as its final norm.
        """
        if exit is None or exit == self.num_layers:
            return self.base
        if exit not in self.exits:
            raise BadInputError(
                f"exit {exit}: this checkpoint has exits {','.join(map(str, self.exits))}; "
                f"pick one of them, or {self.num_layers} (or None) for the full model"
            )
        view = self._views.get(exit)
        if view is None:
            view = self._build_view(exit)
            self._views[exit] = view
        return view

    def naive_model(self, exit: int) -> nn.Module:
        """Return the naive early exit at layer `exit`: layers 1..k, the base's final norm and head.

        Like `exit_model`, the result is a view of the base class that shares every module.
        """
        if not 1 <= exit < self.num_layers:
            raise BadInputError(f"naive exit {exit}: expected a layer in 1..{self.num_layers - 1}")
        return build_view(self.base, self.layout.layers(self.base)[:exit], self.layout.final_norm(self.base))

    def _build_view(self, k: int) -> nn.Module:
        layers = [*self.layout.layers(self.base)[:k], self.exit_layers[str(k)]]
        return build_view(self.base, layers, self.exit_norms[str(k)])

    def forward(self, input_ids: torch.Tensor | None = None, exit: int | Literal["all"] | None = None, **kwargs):
        """Run exit `exit` (None: the full model) and return the base class's usual causal-LM output.

        Other keyword arguments (attention_mask, cache, use_cache, labels, ...) go to the model as is.
        `exit="all"` returns `forward_all(input_ids, **kwargs)` instead: training calls it that way so
        that a DistributedDataParallel wrapper records the pass.
        """
        if exit == "all":
            return self.forward_all(input_ids, **kwargs)
        return self.exit_model(exit)(input_ids=input_ids, **kwargs)

    def generate(self, *args, exit: int | None = None, **kwargs):
        """Generate with transformers' `generate` at exit `exit` (None: the full model)."""
        return self.exit_model(exit).generate(*args, **kwargs)

    # One pass for training and evaluation.

    def forward_all(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        exits: Sequence[int] | None = None,
        naive: bool = False,
        loss_temperature: float | None = None,
        loss_chunk_tokens: int = 1024,
        hidden_loss_weight: float = 0.0,
    ) -> BalconyTrainingOutput:
        """Run the base once and every exit on the way, returning hidden states before the head.

        A forward pre-hook on base layer k + 1 catches layer k's output together with the exact
        mask, position ids and position embeddings that the base passes to that slot, and feeds them
        to Balcony layer k. The exit therefore computes what `forward(exit=k)` computes.

        With `loss_temperature` set, the output also carries each exit's distillation loss, plus
        `hidden_loss_weight` times the mean squared error between the exit's hidden state (after its
        norm) and the full model's (after the final norm). The loss is computed here, inside forward,
        because a sharding wrapper (FSDP) gathers the shared LM head's weight only while forward runs.
        """
        exits = self.exits if exits is None else list(exits)
        base_layers = self.layout.layers(self.base)
        exit_hidden: dict[int, torch.Tensor] = {}
        naive_hidden: dict[int, torch.Tensor] = {}
        final_norm = self.layout.final_norm(self.base)

        def make_hook(k: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                exit_out = self.exit_layers[str(k)](*args, **kwargs)
                exit_hidden[k] = self.exit_norms[str(k)](exit_out)
                if naive:
                    naive_hidden[k] = final_norm(hidden)
                return None

            return hook

        handles = [
            base_layers[k].register_forward_pre_hook(make_hook(k), with_kwargs=True) for k in exits
        ]
        try:
            body_out = self.layout.body(self.base)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
        finally:
            for handle in handles:
                handle.remove()
        losses = kl = hidden_mse = None
        if loss_temperature is not None:
            kl = distillation_losses(
                self.head,
                body_out.last_hidden_state,
                [exit_hidden[k] for k in exits],
                attention_mask=attention_mask,
                temperature=loss_temperature,
                chunk_tokens=loss_chunk_tokens,
            )
            losses = kl
            if hidden_loss_weight > 0:
                hidden_mse = hidden_state_losses(
                    body_out.last_hidden_state, [exit_hidden[k] for k in exits], attention_mask=attention_mask
                )
                losses = kl + hidden_loss_weight * hidden_mse
        return BalconyTrainingOutput(
            full_hidden=body_out.last_hidden_state,
            exit_hidden=exit_hidden,
            naive_hidden=naive_hidden if naive else None,
            losses=losses,
            kl=kl,
            hidden_mse=hidden_mse,
        )


def build_view(base: nn.Module, layers: Sequence[nn.Module], final_norm: nn.Module) -> nn.Module:
    """Return an instance of the base's class that runs `layers` and then `final_norm`.

    The view shares the embeddings, the head and the given modules with their owners, so it costs no
    weights. Its config says len(layers) layers, with per-layer lists cut to match. Each layer keeps
    its own KV-cache index, so the layers must be the first ones of the base plus at most one more.
    """
    layout = layout_for(base.config)
    config = layout.truncated_config(base.config, len(layers))
    body_view = shallow_module_copy(layout.body(base))
    setattr(body_view, layout.layers_attr, nn.ModuleList(layers))
    setattr(body_view, layout.final_norm_attr, final_norm)
    body_view.config = config
    view = shallow_module_copy(base)
    setattr(view, layout.body_attr, body_view)
    view.config = config
    return view


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """Copy a module object without copying its parameters or submodules.

    The copy gets its own submodule table, so replacing a submodule on it leaves the original intact.
    """
    clone = copy.copy(module)
    clone._modules = copy.copy(module._modules)
    return clone
