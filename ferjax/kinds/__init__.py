"""What defines each kind of run (config, model, state, optimizer, random streams), below the
trainers: ferjax.kinds.classifier, ferjax.kinds.vaegan."""
