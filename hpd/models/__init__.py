"""Models: the backend interface (`backend`), loading (`loading`), the families' config
forms (`families`), LoRA students (`lora`, `student`), the exported folder's contract
(`export`) and the memory plan (`memory`). Imports `hpd.objectives`, `hpd.files` and
`hpd.data`; never teachers, reports or training."""
