# Sourced by bash_train.sh and bash_parallel_train.sh with their arguments: which model they
# train (--model toy, the default, or transformer: the toy GPT of transformer.py), and its data
# directory and data file, so the scripts can make the data first. Each model's lr and run
# directory are the Python scripts' defaults (training/arguments.py): the original's --init_lr
# 0.001 is the ToyModel's, and `python train.py --model transformer` trains what
# `bash bash_train.sh --model transformer` does.
MODEL=toy
prev=
for arg in "$@"; do
    [ "$prev" = --model ] && MODEL=$arg
    case $arg in --model=*) MODEL=${arg#--model=} ;; esac
    prev=$arg
done
if [ "$MODEL" = transformer ]; then
    DATA_DIR=${DATA_DIR:-data_transformer}; DATA_FILE=tokens_train.npy
else
    DATA_DIR=${DATA_DIR:-data}; DATA_FILE=xtrain.npy
fi
